"""The demo's quality over several seeds: CLIP vs the same encoders at random initialisation.

Runs ``medvlp demo`` (synthesise -> pre-train CLIP -> evaluate) once per seed, each seed
seeding both the synthetic data and the training run, and writes
``benchmarks/results/demo_quality.json`` (every number, per seed) and ``demo_quality.md``
(mean ± sd over seeds, the command and the machine). Resumable: seeds already in the
JSON are skipped unless ``--fresh``.

    python benchmarks/demo_quality.py --seeds 0 1 2 --work /tmp/demo-quality
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "src", "configs"], capture_output=True,
                                text=True, cwd=HERE).stdout.strip())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": None,
            "python": platform.python_version(), "torch": torch.__version__, "git_commit": commit, "git_dirty": dirty}


def summarise(rows: list[dict]) -> dict:
    def stats(values: list[float]) -> dict:
        return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                "n": len(values)}

    keys = [k for k in rows[0]["metrics"]]
    return {k: stats([r["metrics"][k] for r in rows]) for k in keys}


def extract(results: dict) -> dict:
    out = {}
    for model in ("clip", "random-init"):
        m = results[model]
        out[f"{model}/zeroshot_mean_auroc"] = m["zeroshot"]["mean"]
        for frac, probe in m["linear_probe"]["fractions"].items():
            out[f"{model}/linear_probe_auroc@{float(frac):g}"] = probe["mean"]
        out[f"{model}/i2t_R@10"] = m["retrieval"]["image_to_text"]["R@10"]
    for k, v in results["timing"].items():
        out[f"time/{k}"] = v
    return out


def render(data: dict) -> str:
    s = data["summary"]
    lines = [
        "# Demo quality over seeds",
        "",
        f"Command: `{data['command']}`  ",
        f"Machine: {data['machine']['cpu']}, {data['machine']['cores']} cores, torch {data['machine']['torch']}, "
        f"commit {data['machine']['git_commit'][:10]}{' (dirty)' if data['machine']['git_dirty'] else ''}  ",
        f"Seeds: {', '.join(str(r['seed']) for r in data['runs'])}",
        "",
        "| metric | CLIP | random init | difference |",
        "|---|---:|---:|---:|",
    ]
    names = sorted({k.split("/", 1)[1] for k in s if not k.startswith("time/")})
    for name in names:
        a, b = s[f"clip/{name}"], s[f"random-init/{name}"]
        diffs = [r["metrics"][f"clip/{name}"] - r["metrics"][f"random-init/{name}"] for r in data["runs"]]
        d_sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        lines.append(f"| {name} | {a['mean']:.3f} ± {a['sd']:.3f} | {b['mean']:.3f} ± {b['sd']:.3f} | "
                     f"{statistics.fmean(diffs):+.3f} ± {d_sd:.3f} |")
    lines += ["", "| wall time (s) | mean ± sd |", "|---|---:|"]
    for k in sorted(k for k in s if k.startswith("time/")):
        lines.append(f"| {k[5:]} | {s[k]['mean']:.0f} ± {s[k]['sd']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", default="benchmark-runs/demo-quality", help="scratch folder for data and runs")
    parser.add_argument("--fresh", action="store_true", help="ignore seeds already in the results file")
    parser.add_argument("--results", default=str(RESULTS / "demo_quality.json"))
    args = parser.parse_args(argv)

    from medvlp.demo import run_demo

    out_json = Path(args.results)
    data = json.loads(out_json.read_text()) if out_json.is_file() and not args.fresh else {"runs": []}
    done = {r["seed"] for r in data["runs"]}
    for seed in args.seeds:
        if seed in done:
            print(f"seed {seed}: already measured, skipping")
            continue
        results = run_demo(Path(args.work) / f"seed{seed}", seed=seed, progress=False)
        data["runs"].append({"seed": seed, "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
                             "metrics": extract(results)})
        data.update(command="python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
                    machine=machine(), summary=summarise(data["runs"]))
        out_json.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_json.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, out_json)
        out_json.with_suffix(".md").write_text(render(data))
    print(render(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
