"""Wall time of the whole evaluation suite: ``medvlp evaluate <checkpoint> --tasks all``.

Set-up (not timed): ``medvlp synth --preset small`` (~800 images at 64 px) and a tiny CLIP
pre-trained for ``--steps`` steps with the model/train overrides of ``tests/conftest.py``'s
``TINY`` (32 px ViT 32 x 2, text 32 x 1). ``TINY``'s ``eval.*`` entries are left out, so the
suite runs with the default evaluation protocol (``eval.probe_seeds`` 3, ``min_positives`` 2,
label fractions 1 / 10 / 100 %) — the tasks' protocol constants are untouched.

Timed: one in-process ``medvlp.cli.main(["evaluate", CKPT, "--tasks", "all", ...])`` (imports
already done, so Python start-up is not counted). Seconds per task come from wrapping the
task functions the runner calls (the runner does not log per-task times); ``embed`` is the
forward passes over the test and probe-training splits, ``report`` is ``write_report``.

    OMP_NUM_THREADS=1 python benchmarks/suite_time.py            # ~ a few minutes on 2 cores

Results: ``benchmarks/results/suite_time.json`` and ``benchmarks/results/suite_time.md``.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

BENCHMARK, VERSION = "suite_time", 1
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TARGET_S = 300.0  # the target: the whole suite under 5 minutes on this 2-core machine
# tests/conftest.py TINY without its eval.* entries (see the module docstring)
TINY_MODEL = [
    "model.embed_dim=32",
    "model.vision.image_size=32", "model.vision.patch_size=8", "model.vision.width=32", "model.vision.depth=2",
    "model.vision.heads=2",
    "model.text.width=32", "model.text.depth=1", "model.text.heads=2", "model.text.vocab_size=300",
    "model.text.max_length=48",
    "data.batch_size=8", "train.warmup_steps=1", "train.log_every=5", "train.progress=false",
    "train.tensorboard=false",
]
# (module, attribute, task name) of the functions timed; the runner imports its seven by name,
# the downstream tasks are imported from their modules at call time
TIMED = [
    ("medvlp.eval.runner", "embed_split", "embed"),
    ("medvlp.eval.runner", "evaluate_zero_shot", "zeroshot"),
    ("medvlp.eval.runner", "evaluate_retrieval", "retrieval"),
    ("medvlp.eval.runner", "evaluate_retrieval_itm", "retrieval_itm"),
    ("medvlp.eval.runner", "evaluate_linear_probe", "linear_probe"),
    ("medvlp.eval.runner", "evaluate_localization", "localization"),
    ("medvlp.eval.runner", "evaluate_prompt_tuning", "prompt_tuning"),
    ("medvlp.eval.runner", "write_report", "report"),
    ("medvlp.eval.vqa", "evaluate_vqa", "vqa"),
    ("medvlp.eval.finetune", "evaluate_finetune", "finetune"),
    ("medvlp.eval.segmentation", "evaluate_segmentation", "segmentation"),
    ("medvlp.eval.detection", "evaluate_detection", "detection"),
]


def install_timers(seconds: dict[str, float]) -> None:
    """Replace each function of :data:`TIMED` by a wrapper adding its wall time to ``seconds``."""
    import importlib

    def timed(fn, task):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[task] += time.perf_counter() - start

        return wrapper

    for module, attr, task in TIMED:
        mod = importlib.import_module(module)
        setattr(mod, attr, timed(getattr(mod, attr), task))


def write_markdown(entry: dict, path: Path) -> None:
    lines = [
        "# Evaluation suite wall time (`medvlp evaluate CKPT --tasks all`)",
        "",
        f"Command: `{entry['command']}`  ",
        (f"Data: SynthCXR `small` preset ({entry['n_test']} test images); checkpoint: tiny CLIP, "
         f"{entry['pretrain_steps']} steps. Machine: {entry['machine'].get('cpu', '?')}, "
         f"{entry['machine'].get('cores', entry['machine'].get('cpu_count', '?'))} cores, "
         f"torch threads {entry['torch_threads']}. Date: {entry['date']}."),
        "",
        (f"**Total: {entry['total_s']:.1f} s** (target {TARGET_S:.0f} s: "
         f"{'met' if entry['total_s'] <= TARGET_S else 'NOT met'})."),
        "",
        "| part | seconds | share |",
        "|---|---:|---:|",
    ]
    for task, sec in sorted(entry["seconds_per_task"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {task} | {sec:.1f} | {100 * sec / entry['total_s']:.0f} % |")
    lines += ["", f"Skipped tasks: {entry['skipped_tasks'] or 'none'}.", "",
              "Regenerate with `OMP_NUM_THREADS=1 python benchmarks/suite_time.py`."]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=20, help="pre-training steps of the tiny checkpoint")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-save", action="store_true", help="print, do not write benchmarks/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from medvlp.cli import main as cli

    work = Path(args.work or tempfile.mkdtemp(prefix="suite_time_"))
    data, run, out = work / "data", work / "run", work / "eval"
    if not (data / "manifest.jsonl").exists():
        assert cli(["synth", "--preset", "small", "--out", str(data), "--no-progress", "--workers", "1"]) == 0
    assert cli(["pretrain", "--config", str(REPO / "configs/experiments/demo.yaml"), *TINY_MODEL,
                f"data.manifest={data}", f"train.output_dir={run}", f"train.steps={args.steps}"]) == 0

    seconds: dict[str, float] = defaultdict(float)
    install_timers(seconds)
    command = ["evaluate", str(run), "--tasks", "all", "--out", str(out)]
    start = time.perf_counter()
    code = cli(command)
    total = time.perf_counter() - start
    if code != 0:
        print(f"medvlp evaluate exited {code}", file=sys.stderr)
        return code
    metrics = json.loads((out / "metrics.json").read_text())
    model = next(iter(metrics.values()))
    seconds["other (loading, splits, checks)"] = max(0.0, total - sum(seconds.values()))
    try:
        from medvlp.bench import machine_info

        machine = machine_info()
    except ImportError:
        import platform

        machine = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    from medvlp.bench import utc_now

    entry = {
        "benchmark": BENCHMARK, "version": VERSION, "date": utc_now(),
        "command": "medvlp evaluate CKPT --tasks all --out DIR",
        "pretrain_steps": args.steps, "torch_threads": torch.get_num_threads(), "machine": machine,
        "n_test": model["meta"]["n_test"], "total_s": round(total, 2), "target_s": TARGET_S,
        "seconds_per_task": {k: round(v, 2) for k, v in seconds.items()},
        "skipped_tasks": (model["meta"].get("skipped_tasks") or {}),
        "outputs": sorted(p.name for p in out.iterdir() if p.is_file()),
    }
    print(json.dumps(entry, indent=2))
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "suite_time.json").write_text(json.dumps(entry, indent=2) + "\n")
        write_markdown(entry, RESULTS / "suite_time.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
