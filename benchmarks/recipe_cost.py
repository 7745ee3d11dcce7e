"""Step time and peak memory of each recipe relative to CLIP, at the same batch, in one run.

    python benchmarks/recipe_cost.py --dataset /work/bench/standard-v1 \\
        --config configs/experiments/synthcxr_standard.yaml \\
        --recipes clip,mae,mrm,m3ae,mpma,maskedclip --batch-size 64

Each recipe's config is resolved exactly as ``benchmarks/compare.py`` resolves it (recipe YAML,
then the experiment's shared sections, then ``--set`` / ``--recipe-set``), its model is built
as the training loop builds it, and the loop's first real batch is fed to it repeatedly.
One step is the loop's full optimizer step: forward + loss, backward, gradient clipping,
AdamW step, ``zero_grad``, ``after_optimizer_step`` (EMA teachers included).

Every (round, recipe) measurement runs in its own subprocess, so peak memory (``ru_maxrss``)
is that recipe's alone; rounds alternate the recipe order (reversed on odd rounds) so machine
drift hits all recipes alike, and each recipe's cost is reported as the median over rounds
of its ratio to CLIP's step time *in the same round*. Memory: the process peak and the peak
growth over the RSS right after the model, optimizer and batch are built (activations,
gradients and optimizer state).

Results: ``benchmarks/results/recipe_cost.json`` and ``.md`` (with the command and machine).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> dict:
    """Measure one recipe in this process."""
    import torch
    from compare import _init_model, parse_recipe_sets, recipe_config

    from medvlp.bench import first_batch, step_flops
    from medvlp.data.manifest import read_info
    from medvlp.train.optim import build_optimizer

    torch.set_num_threads(args.threads)
    recipes = args.recipes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        args.steps, args.max_minutes, args.tasks, args.name = 10, 0, None, "recipe-cost"
        cfg = recipe_config(args.child, 0, args, parse_recipe_sets(args.recipe_set, recipes), Path(tmp))
        method, tokenizer, _ = _init_model(cfg)
        batch = first_batch(cfg, tokenizer, read_info(cfg.data.manifest).get("classes", []))
        optimizer = build_optimizer(method, cfg.train, torch.device("cpu"))
        method.train()
        built = _rss_mib()
        times = []
        for step in range(args.warmup + args.timed_steps):
            t0 = time.perf_counter()
            loss = method(batch)["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(method.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            method.after_optimizer_step(step)
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        flops = step_flops(method, batch)  # exact: forward + backward of this batch (optimizer excluded)
        n_params = sum(p.numel() for p in method.parameters() if p.requires_grad)
    return {"recipe": args.child, "step_s": statistics.median(times), "steps": times, "peak_rss_mib": peak,
            "built_rss_mib": built, "train_growth_mib": peak - built, "trainable_params": n_params, "flops": flops,
            "batch_size": len(batch), "paired_in_batch": int(batch.has_text.sum()) if batch.has_text is not None else 0}


def render(data: dict) -> str:
    lines = [
        "# Recipe cost relative to CLIP (same batch, same machine, one run)", "",
        f"Command: `{data['command']}`", "",
        (f"Machine: {data['machine']}. {data['threads']} torch thread(s); batch {data['batch_size']}; "
        f"{data['steps']} timed steps after {data['warmup']} warm-up steps per (round, recipe); {data['rounds']} rounds "
        "with alternating order; ratios are medians over rounds of the ratio to CLIP in the same round."), "",
        "| recipe | step (s) | x CLIP step | GFLOP / step | x CLIP FLOPs | peak RSS (MiB) | x CLIP peak | training growth (MiB) | x CLIP growth | trainable params (M) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in data["recipes"].items():
        lines.append(f"| {name} | {r['step_s']:.3f} | {r['step_ratio']:.2f} | {r['gflops']:.1f} | {r['flops_ratio']:.2f} | {r['peak_rss_mib']:.0f} | {r['peak_ratio']:.2f} | "
                     f"{r['train_growth_mib']:.0f} | {r['growth_ratio']:.2f} | {r['trainable_params'] / 1e6:.2f} |")
    lines += ["", ("FLOPs are exact (forward + backward of the batch, torch's FlopCounterMode); step times on this shared 2-core VM vary by +-20 % between rounds (per-round ratios in the JSON). Peak RSS is the whole process (Python, torch, the model, one batch); training growth is the peak "
              "minus the RSS after building the model, optimizer and batch (activations, gradients, optimizer state).")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--config", default=None, help="experiment YAML whose non-method sections every recipe shares")
    p.add_argument("--recipes", default="clip,mae,mrm,m3ae,mpma,maskedclip")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--timed-steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--recipe-set", action="append", default=[])
    p.add_argument("--recipes-dir", default=str(HERE.parent / "configs" / "methods"))
    p.add_argument("--results", default=str(HERE / "results" / "recipe_cost"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        steps = args.timed_steps
        result = child(args)
        result["steps_timed"] = steps
        Path(args.child_out).write_text(json.dumps(result))
        return 0

    from medvlp.bench import machine_info, utc_now

    recipes = args.recipes.split(",")
    if "clip" not in recipes:
        raise SystemExit("--recipes must include clip (the reference)")
    rounds: list[dict[str, dict]] = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for r in range(args.rounds):
        order = recipes if r % 2 == 0 else recipes[::-1]
        got = {}
        for recipe in order:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                cmd = [sys.executable, __file__, *argv, "--child", recipe, "--child-out", out.name]
                subprocess.run(cmd, check=True, env=env)
                got[recipe] = json.loads(Path(out.name).read_text())
            print(f"round {r} {recipe}: {got[recipe]['step_s']:.3f} s/step, peak {got[recipe]['peak_rss_mib']:.0f} MiB",
                  flush=True)
        rounds.append(got)

    def med(recipe: str, key: str) -> float:
        return statistics.median(rd[recipe][key] for rd in rounds)

    def ratio(recipe: str, key: str) -> float:
        return statistics.median(rd[recipe][key] / rd["clip"][key] for rd in rounds)

    table = {name: {"step_s": med(name, "step_s"), "step_ratio": ratio(name, "step_s"),
                    "peak_rss_mib": med(name, "peak_rss_mib"), "peak_ratio": ratio(name, "peak_rss_mib"),
                    "train_growth_mib": med(name, "train_growth_mib"), "growth_ratio": ratio(name, "train_growth_mib"),
                    "trainable_params": rounds[0][name]["trainable_params"],
                    "gflops": rounds[0][name]["flops"] / 1e9,
                    "flops_ratio": rounds[0][name]["flops"] / rounds[0]["clip"]["flops"],
                    "paired_in_batch": rounds[0][name]["paired_in_batch"]}
             for name in recipes}
    m = machine_info()
    data = {"benchmark": "recipe_cost", "version": 1, "date": utc_now(),
            "command": "python benchmarks/recipe_cost.py " + " ".join(shlex.quote(a) for a in argv),
            "machine": f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {m.get('torch', '?')}",
            "machine_info": m, "threads": args.threads, "batch_size": args.batch_size, "steps": args.timed_steps,
            "warmup": args.warmup, "rounds": args.rounds, "recipes": table, "raw": rounds}
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2))
    out.with_suffix(".md").write_text(render(data))
    print(render(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
