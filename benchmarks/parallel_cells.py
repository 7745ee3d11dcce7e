"""Run the cells of one or more comparison grids in parallel, on a machine with many cores or a GPU.

``benchmarks/compare.py`` runs its (recipe, seed) cells one after another. On a machine with
16 cores and a GPU that leaves most of it idle, so this driver starts one ``compare.py``
process per cell (``--recipes R --seeds S``), at most ``--jobs`` at a time, each with
``OMP_NUM_THREADS = cores // jobs``. A cell writes its run folder exactly as a sequential run
would (``<out>/runs/<recipe>-seed<seed>``); the per-cell aggregates go to a scratch folder,
and the real aggregate is made afterwards with ``compare.py ... --aggregate-only`` over all
the run folders.

For leases with a hard end (a borrowed GPU) the driver stops starting cells after
``--launch-until`` seconds and stops running ones at ``--stop-at`` seconds; a stopped cell
keeps its last checkpoint (every ``train.save_every`` steps) and resumes when run again.

The plan is a JSON file: a list of grids, each with the arguments ``compare.py`` takes::

    [{"name": "synthcxr-standard-v1-gpu", "dataset": "/work/bench/standard-v1",
      "config": "configs/experiments/synthcxr_standard.yaml",
      "recipes": ["clip", "mae"], "seeds": [0, 1, 2], "steps": 1000, "batch_size": 64,
      "tasks": "zeroshot,retrieval", "set": ["train.progress=false"], "recipe_set": [],
      "out": "benchmark-runs/synthcxr-standard-v1-gpu", "max_minutes": 240}]

Cells start in plan order (put what matters most first); ``--only`` picks recipes;
``"recipe_seeds": {"clip": [1, 2]}`` in a grid runs other seeds for one recipe (e.g. only the
cells still missing on a fresh machine).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cell_commands(plan: list[dict], scratch: Path, device: str | None, only: set[str] | None) -> list[tuple[str, list[str]]]:
    """One ``compare.py`` command line per (grid, recipe, seed), in plan order."""
    cells = []
    for grid in plan:
        for recipe in grid["recipes"]:
            if only and recipe not in only:
                continue
            for seed in grid.get("recipe_seeds", {}).get(recipe, grid["seeds"]):
                tag = f"{grid['name']}/{recipe}-seed{seed}"
                cmd = [sys.executable, str(HERE / "compare.py"), "--name", grid["name"], "--dataset", grid["dataset"],
                       "--recipes", recipe, "--seeds", str(seed), "--steps", str(grid["steps"]),
                       "--batch-size", str(grid["batch_size"]), "--max-minutes", str(grid.get("max_minutes", 240)),
                       "--out", grid["out"], "--results-dir", str(scratch / tag.replace("/", "__"))]
                if grid.get("config"):
                    cmd += ["--config", grid["config"]]
                if grid.get("tasks"):
                    cmd += ["--tasks", grid["tasks"]]
                for item in grid.get("set", []):
                    cmd += ["--set", item]
                for item in grid.get("recipe_set", []):
                    if item.split(":", 1)[0] == recipe:
                        cmd += ["--recipe-set", item]
                if device:
                    cmd += ["--device", device]
                cells.append((tag, cmd))
    return cells


def run_cells(cells: list[tuple[str, list[str]]], jobs: int, logs: Path, launch_until: float, stop_at: float) -> dict:
    """Run the cells with at most ``jobs`` at once; returns {tag: status}."""
    logs.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    start, queue, running, status = time.monotonic(), list(cells), {}, {}
    while queue or running:
        elapsed = time.monotonic() - start
        while queue and len(running) < jobs and elapsed < launch_until:
            tag, cmd = queue.pop(0)
            log = open(logs / (tag.replace("/", "__") + ".log"), "w")
            running[tag] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, time.monotonic())
            print(f"[{elapsed:6.0f}s] start {tag}", flush=True)
        if elapsed >= launch_until and queue:
            for tag, _ in queue:
                status[tag] = "not started (launch window over)"
            queue = []
        for tag, (proc, log, t0) in list(running.items()):
            code = proc.poll()
            if code is None and elapsed >= stop_at:
                proc.terminate()
                try:
                    code = proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    code = proc.wait()
                status[tag] = f"stopped at the deadline after {time.monotonic() - t0:.0f}s"
            elif code is not None:
                status[tag] = "done" if code == 0 else f"failed (exit {code})"
            if code is not None:
                log.close()
                del running[tag]
                print(f"[{elapsed:6.0f}s] {status[tag]}: {tag} ({time.monotonic() - t0:.0f}s)", flush=True)
        time.sleep(1.0)
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", required=True, help="JSON list of grids (see above)")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="cells at once")
    p.add_argument("--device", default=None, help="passed to compare.py (default: cuda if available)")
    p.add_argument("--only", default=None, help="comma-separated recipes to run (default: all in the plan)")
    p.add_argument("--launch-until", type=float, default=float("inf"), help="start no cell after this many seconds")
    p.add_argument("--stop-at", type=float, default=float("inf"), help="stop running cells at this many seconds")
    p.add_argument("--logs", default="benchmark-runs/parallel-logs", help="one log per cell")
    args = p.parse_args(argv)
    plan = json.loads(Path(args.plan).read_text())
    only = set(args.only.split(",")) if args.only else None
    logs = Path(args.logs)
    cells = cell_commands(plan, logs / "scratch-results", args.device, only)
    print(f"{len(cells)} cells, {args.jobs} at once", flush=True)
    status = run_cells(cells, args.jobs, logs, args.launch_until, args.stop_at)
    (logs / "status.json").write_text(json.dumps(status, indent=2) + "\n")
    failed = [t for t, s in status.items() if s != "done"]
    print(f"{len(status) - len(failed)} of {len(status)} cells done" + (f"; not done: {failed}" if failed else ""))
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
