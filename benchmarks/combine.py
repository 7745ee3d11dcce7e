"""One comparison table from recipes of several finished grids (``compare.py`` aggregates).

A grid can be split across machines (say, some recipes trained on a borrowed GPU, others on the
2-core CPU). This script puts chosen recipes of several aggregates into one table, after
checking that they share the benchmark version (the same data) and the budget (steps x batch);
each row keeps the machine its runs ran on, and a recipe that appears in two grids gets the grid
name in its row label::

    python benchmarks/combine.py --name issue4-masked \\
        --take synthcxr-standard-v1:clip,mae,mrm --take synthcxr-standard-v1-gpu:m3ae,mpma,maskedclip

writes ``benchmarks/results/<name>.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from medvlp.bench import plot_grid, render_markdown, utc_now
from medvlp.errors import ConfigError, MedvlpError

HERE = Path(__file__).resolve().parent


def combine(takes: list[tuple[str, list[str]]], results_dir: Path, name: str, command: str) -> dict:
    """The combined aggregate of ``(grid name, recipes)`` picks."""
    grids = {}
    for grid, _ in takes:
        path = results_dir / f"{grid}.json"
        if not path.is_file():
            raise ConfigError(f"--take {grid}: no aggregate {path}; run benchmarks/compare.py --name {grid} first")
        grids[grid] = json.loads(path.read_text())
    first = grids[takes[0][0]]
    for grid, data in grids.items():
        if data["benchmark"] != first["benchmark"]:
            raise ConfigError(f"--take {grid}: made on another benchmark version than {takes[0][0]} "
                              "(different data or runner format); the rows would not be comparable")
        if (data["budget"]["steps"], data["budget"]["batch_size"]) != (first["budget"]["steps"], first["budget"]["batch_size"]):
            raise ConfigError(f"--take {grid}: budget {data['budget']} differs from {takes[0][0]}'s {first['budget']}")
    counts: dict[str, int] = {}
    for _, recipes in takes:
        for r in recipes:
            counts[r] = counts.get(r, 0) + 1
    table, sources = {}, {}
    for grid, recipes in takes:
        for recipe in recipes:
            if recipe not in grids[grid]["recipes"]:
                raise ConfigError(f"--take {grid}:{recipe}: that grid has no finished runs of {recipe!r} "
                                  f"(it has {', '.join(grids[grid]['recipes'])})")
            label = recipe if counts[recipe] == 1 else f"{recipe} [{grid}]"
            table[label], sources[label] = grids[grid]["recipes"][recipe], grid
    return {"name": name, "command": command, "date": utc_now(), "machine": first["machine"],
            "budget": first["budget"], "benchmark": first["benchmark"], "recipes": table, "sources": sources}


def _take(text: str) -> tuple[str, list[str]]:
    grid, _, recipes = text.partition(":")
    names = [r.strip() for r in recipes.split(",") if r.strip()]
    if not grid or not names:
        raise ConfigError(f"--take {text!r}: expected GRID:RECIPE[,RECIPE...]")
    return grid, names


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="output name: <results-dir>/<name>.{json,md}")
    p.add_argument("--take", action="append", required=True, metavar="GRID:RECIPES", help="recipes of one grid (repeat)")
    p.add_argument("--results-dir", default=str(HERE / "results"))
    args = p.parse_args(argv)
    try:
        results_dir = Path(args.results_dir)
        data = combine([_take(t) for t in args.take], results_dir, args.name,
                       "python benchmarks/combine.py " + " ".join(shlex.quote(a) for a in argv))
    except MedvlpError as exc:
        print(f"combine: error: {exc}", file=sys.stderr)
        return exc.exit_code
    data["plots"] = plot_grid(data, results_dir, args.name)
    md = render_markdown(data).replace("# Comparison:", "# Combined comparison:", 1)
    md += "\nRows come from these grids: " + ", ".join(f"{k} ← {v}" for k, v in data["sources"].items()) + ".\n"
    (results_dir / f"{args.name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (results_dir / f"{args.name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
