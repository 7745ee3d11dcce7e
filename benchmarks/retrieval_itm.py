"""Retrieval by the ITM head (task ``retrieval_itm``) on the finished cells of a comparison grid.

The suite grid (``benchmarks/compare.py``) was trained and evaluated before the ``retrieval_itm``
task existed; re-running its cells with another ``eval.tasks`` would be refused as another
config. This script evaluates only that task on each cell's final checkpoint, through the same
``medvlp evaluate`` path (pre-training overlap checks included), into ``<cell>/eval-itm`` (a cell
that has one is read back, ``--force`` re-evaluates), and aggregates mean ± sd over seeds. It also reads each cell's training log for the ITM loss: one
positive per two negatives, a head that learned nothing sits at the prior's entropy
H(1/3) = 0.6365 nats.

    python benchmarks/retrieval_itm.py --grid benchmark-runs/synthcxr-standard-v1-suite \\
        --dataset /work/bench/standard-v1 --recipes clip,slip,mlip,unimlip,mpma,m3ae --seeds 0,1,2

Results: ``benchmarks/results/<name>.json`` and ``.md`` (``--name``, default
``synthcxr-standard-v1-itm``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PRIOR_ENTROPY = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))  # ITM: B positives, 2B negatives

#: (metric key, column title) of the table
COLUMNS = [
    ("i2t_R@10", "ITC i→t R@10 (all test)"),
    ("itm_rerank_i2t_R@10", "ITM re-ranked i→t R@10"),
    ("t2i_R@10", "ITC t→i R@10 (all test)"),
    ("itm_rerank_t2i_R@10", "ITM re-ranked t→i R@10"),
    ("itc_pool_i2t_R@10", "pool ITC i→t R@10"),
    ("itm_pool_i2t_R@1", "pool ITM i→t R@1"),
    ("itm_pool_i2t_R@10", "pool ITM i→t R@10"),
    ("itm_pool_t2i_R@10", "pool ITM t→i R@10"),
    ("train_loss_itm", "training ITM loss (last 100 steps)"),
]


def itm_training_loss(run_dir: Path, last_steps: int = 100) -> float | None:
    """Mean logged ``loss_itm`` over the last ``last_steps`` steps of a run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if '"loss_itm"' in line]
    if not rows:
        return None
    end = rows[-1]["step"]
    values = [r["loss_itm"] for r in rows if r["step"] > end - last_steps]
    return sum(values) / len(values)


def evaluate_cell(cell: Path, dataset: str, device: str, force: bool = False) -> dict:
    from medvlp.cli import main
    from medvlp.train.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(cell / "train")
    if checkpoint is None:
        raise SystemExit(f"{cell}: no checkpoint under train/ (run the grid first)")
    out = cell / "eval-itm"
    t0, seconds = time.perf_counter(), None
    if force or not (out / "metrics.json").is_file():  # a finished cell is reused (its evaluation is read back)
        rc = main(["evaluate", str(checkpoint), "--data", dataset, "--tasks", "retrieval_itm", "--out", str(out),
                   "--device", device])
        if rc != 0:
            raise SystemExit(f"{cell}: medvlp evaluate failed (exit {rc})")
        seconds = time.perf_counter() - t0
    evaluation = next(iter(json.loads((out / "metrics.json").read_text()).values()))
    result = json.loads((cell / "result.json").read_text()) if (cell / "result.json").is_file() else {}
    return {"checkpoint": str(checkpoint), "seconds": seconds, "evaluation": evaluation,
            "itc": (result.get("metrics") or {}), "train_loss_itm": itm_training_loss(cell / "train")}


def run(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grid", required=True, help="the comparison's run folder (holding runs/<recipe>-seed<N>)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--recipes", required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--name", default="synthcxr-standard-v1-itm")
    p.add_argument("--device", default="cpu")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--force", action="store_true", help="re-evaluate cells that already have eval-itm/metrics.json")
    args = p.parse_args(argv)
    from medvlp.bench import extract_metrics, machine_info, stats, utc_now

    recipes = [r for r in args.recipes.split(",") if r]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    cells, table = {}, {}
    for recipe in recipes:
        rows = []
        for seed in seeds:
            cell = Path(args.grid) / "runs" / f"{recipe}-seed{seed}"
            print(f"[{recipe}-seed{seed}]", flush=True)
            got = evaluate_cell(cell, args.dataset, args.device, args.force)
            metrics = extract_metrics(got["evaluation"])
            metrics["i2t_R@10"] = got["itc"].get("i2t_R@10")
            metrics["t2i_R@10"] = got["itc"].get("t2i_R@10")
            metrics["train_loss_itm"] = got["train_loss_itm"]
            cells[f"{recipe}-seed{seed}"] = {**got, "metrics": metrics}
            rows.append(metrics)
        keys = list(dict.fromkeys(k for r in rows for k in r))
        table[recipe] = {"seeds": seeds, "metrics": {k: stats(r.get(k) for r in rows) for k in keys}}
    first = next(iter(cells.values()))["evaluation"]
    pool = (first.get("retrieval_itm") or {}).get("pool") or {}
    data = {"name": args.name, "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
            "date": utc_now(), "machine": machine_info(), "threads": os.environ.get("OMP_NUM_THREADS"),
            "prior_entropy": PRIOR_ENTROPY, "pool": {"n": pool.get("n"), "chance": pool.get("chance")},
            "rerank_k": next((c["evaluation"]["retrieval_itm"]["rerank"]["k"] for c in cells.values()
                              if "rerank" in (c["evaluation"].get("retrieval_itm") or {})), None),
            "recipes": table, "cells": cells}
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (out / f"{args.name}.md").write_text(markdown(data))
    print(markdown(data))
    return data


def _cell(s: dict) -> str:
    if not s or s.get("mean") is None:
        return "–"
    return f"{s['mean']:.3f}" + (f" ± {s['sd']:.3f}" if s.get("n", 1) > 1 else "")


def markdown(data: dict) -> str:
    m = data["machine"]
    chance = data["pool"].get("chance") or {}
    lines = [f"# Retrieval by the ITM head: {data['name']}", "",
             f"Command: `{data['command']}`  ",
             f"Machine: {m.get('cpu')}, {m.get('cores')} cores, GPU {m.get('gpu') or 'none'}, torch {m.get('torch')}, "
             f"commit {(m.get('git_commit') or '?')[:10]}{' (dirty)' if m.get('git_dirty') else ''}  ",
             f"Date: {data['date']}", "",
             f"Mean ± sd over seeds. Pool: {data['pool'].get('n')} fixed test pairs, every image x report scored; "
             f"chance R@1 / R@10 = {chance.get('R@1', float('nan')):.4f} / {chance.get('R@10', float('nan')):.4f}. "
             f"Re-ranking: the ITC top {data.get('rerank_k')} of every query re-ordered by ITM, over the whole test "
             f"split. Task seconds per cell are in the JSON (`evaluation.meta.seconds`). "
             f"Training ITM loss at the prior (a head that learned nothing): {data['prior_entropy']:.4f}.", "",
             "| recipe | n | " + " | ".join(t for _, t in COLUMNS) + " |",
             "|---|---:|" + "---:|" * len(COLUMNS)]
    for recipe, row in data["recipes"].items():
        lines.append(f"| {recipe} | {len(row['seeds'])} | " + " | ".join(_cell(row["metrics"].get(k)) for k, _ in COLUMNS)
                     + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run()
