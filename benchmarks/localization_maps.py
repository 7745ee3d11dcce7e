"""Localisation with both heat maps, on a comparison grid's trained checkpoints.

The comparison runner (``benchmarks/compare.py``) scores localisation with whatever maps the
code of its day made; cells trained before the word-level map existed hold only the sentence
map. This script re-runs only the localisation task (``medvlp evaluate CKPT --tasks
localization``, in process, one checkpoint at a time) on the final checkpoint of every
``<recipe>-seed<N>`` cell of a grid folder and tabulates, per recipe (mean ± sd over seeds):

- the sentence map: cosine(patch embedding, positive prompt ensemble), as in the grid;
- the word map: mean over the prompts' words of softmax_patches(4 cosine(word, patch)) — the
  token-patch attention GLoRIA-style local alignment trains (``docs/evaluation.md``);
- chance levels of both metrics (the same pairs for every model).

    OMP_NUM_THREADS=1 python benchmarks/localization_maps.py \\
        --grid benchmark-runs/synthcxr-standard-v1-label --recipes clip,medclip,umcl,mgca,gloria --seeds 0,1,2 \\
        --name localization-maps-label

Results: ``benchmarks/results/<name>.json`` and ``.md``; per-checkpoint reports in
``<grid>/localization-maps/<cell>/``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BENCHMARK, VERSION = "localization_maps", 1
METRICS = [("pointing_game", ["pointing_game"]), ("iou_top10", ["iou_topk"]),
           ("pointing_game_words", ["words", "pointing_game"]), ("iou_top10_words", ["words", "iou_topk"]),
           ("chance_pointing_game", ["chance", "pointing_game"]), ("chance_iou_top10", ["chance", "iou_topk"])]
TITLES = {"pointing_game": "pointing game, sentence map", "iou_top10": "top-10 % IoU, sentence map",
          "pointing_game_words": "pointing game, word map", "iou_top10_words": "top-10 % IoU, word map",
          "chance_pointing_game": "pointing game chance", "chance_iou_top10": "top-10 % IoU chance"}


def _dig(d: dict, path: list[str]):
    for key in path:
        d = (d or {}).get(key)
    return (d or {}).get("mean") if isinstance(d, dict) else None


def evaluate_cell(run: Path, out: Path) -> dict:
    """The localisation result of ``run``'s latest checkpoint (its ``train`` folder)."""
    from medvlp.cli import main

    code = main(["evaluate", str(run / "train"), "--tasks", "localization", "--out", str(out), "--device", "cpu"])
    if code != 0:
        raise SystemExit(f"medvlp evaluate failed for {run} (exit {code})")
    metrics = json.loads((out / "metrics.json").read_text())
    (loc,) = [m.get("localization") for m in metrics.values() if isinstance(m, dict) and "localization" in m]
    return loc


def main(argv: list[str] | None = None) -> int:
    from medvlp.bench import machine_info, stats, utc_now

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", required=True, help="a compare.py output folder (holds runs/<recipe>-seed<N>)")
    ap.add_argument("--recipes", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--name", required=True, help="results file stem under benchmarks/results")
    args = ap.parse_args(argv)
    grid = Path(args.grid)
    recipes = args.recipes.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    cells, t0 = [], time.perf_counter()
    for recipe in recipes:
        for seed in seeds:
            run = grid / "runs" / f"{recipe}-seed{seed}"
            if not (run / "train" / "checkpoints").is_dir():
                print(f"  {run}: no checkpoint, left out", file=sys.stderr)
                continue
            start = time.perf_counter()
            loc = evaluate_cell(run, grid / "localization-maps" / run.name)
            row = {"recipe": recipe, "seed": seed, "seconds": round(time.perf_counter() - start, 1),
                   **{key: _dig(loc, path) for key, path in METRICS},
                   "per_class_words": (loc.get("words") or {}).get("pointing_game", {}).get("per_class"),
                   "per_class_sentence": loc["pointing_game"]["per_class"]}
            cells.append(row)
            print(f"  {run.name}: " + ", ".join(f"{k} {row[k]:.3f}" for k, _ in METRICS if row[k] is not None), flush=True)
    summary = {r: {k: stats([c[k] for c in cells if c["recipe"] == r and c[k] is not None]) for k, _ in METRICS}
               for r in recipes if any(c["recipe"] == r for c in cells)}
    for r in summary:
        summary[r]["n"] = sum(c["recipe"] == r for c in cells)
    command = "python benchmarks/localization_maps.py " + " ".join(argv if argv is not None else sys.argv[1:])
    data = {"benchmark": BENCHMARK, "version": VERSION, "command": command, "date": utc_now(),
            "machine": machine_info(), "grid": str(grid), "seconds": round(time.perf_counter() - t0, 1),
            "summary": summary, "cells": cells}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(data, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text(render(data))
    print(render(data))
    return 0


def render(data: dict) -> str:
    from medvlp.bench import machine_label

    keys = [k for k, _ in METRICS]
    lines = [f"# Localisation, sentence map vs word map ({data['grid']})", "",
             f"Command: `{data['command']}`  ", f"Machine: {machine_label(data['machine'])}  ",
             f"Date: {data['date']}", "",
             "| recipe | n | " + " | ".join(TITLES[k] for k in keys) + " |",
             "|---|---:|" + "---:|" * len(keys)]
    for recipe, s in data["summary"].items():
        cells = [f"{s[k]['mean']:.3f} ± {s[k]['sd']:.3f}" if s[k].get("n") else "–" for k in keys]
        lines.append(f"| {recipe} | {s['n']} | " + " | ".join(cells) + " |")
    lines += ["", "Mean ± sd over seeds. Sentence map: cosine(patch embedding, positive prompt ensemble). Word map: "
              "mean over the prompts' own words of softmax over patches of 4 x cosine(word embedding, patch "
              "embedding). Chance: a constant map (pointing game: mask area; IoU: hypergeometric expectation).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
