"""Data-wait benchmark: how much of a training step waits for data, shards vs PNG folder.

The CLIP demo model (``configs/experiments/demo.yaml``) at ``model.vision.image_size=224``
trains on a SynthCXR set rendered at 224 px (``--preset small --image-size 224 --shards``,
generated here when ``--data`` does not exist yet). Each setting builds the training stream
exactly as ``medvlp.train.loop.pretrain`` does (``MixedStream`` over the PNG folder, or
``ShardStream`` over the shards with ``data.shards``) with the default loader settings
(``data.num_workers`` and ``data.shuffle_buffer`` from the config unless overridden), runs
``--warmup`` steps, then times ``--steps`` steps: *wait* is the time ``next(batches)`` takes,
*compute* forward + backward + optimizer step. Share = wait / (wait + compute).

The memory part streams one epoch of 10 and of 100 shards (same shard size, 224 px images,
decode included) in fresh subprocesses and reports each one's peak RSS.

    OMP_NUM_THREADS=1 python benchmarks/data_wait.py --data /tmp/dw/synth224

Results: ``benchmarks/results/data_wait.json`` and ``.md`` (the "notes" in the committed JSON were added
after the run: machine load, interpretation).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BENCHMARK, VERSION = "data_wait", 1


def ensure_data(path: Path) -> None:
    if (path / "manifest.jsonl").is_file() and (path / "shards" / "shards.json").is_file():
        return
    from medvlp.data.synth import generate

    generate(path, preset="small", image_size=224, shards=True, shard_size=100, workers=1, progress=False)


def run_setting(data: Path, source: str, steps: int, warmup: int, overrides: list[str]) -> dict:
    from medvlp.config import load_config
    from medvlp.data.manifest import read_info
    from medvlp.data.mixed import MixedStream, read_sources
    from medvlp.data.stream import ShardStream, read_shard_sources
    from medvlp.data.tokenize import train_wordpiece
    from medvlp.data.transforms import IMAGE_CACHE, Preprocess
    from medvlp.hub import build_method
    from medvlp.train.optim import build_optimizer, build_scheduler

    extra = [f"data.shards={data / 'shards'}"] if source == "shards" else []
    cfg = load_config(REPO / "configs/experiments/demo.yaml",
                      [f"data.manifest={data}", "model.vision.image_size=224", *overrides, *extra])
    torch.manual_seed(0)
    sources = read_shard_sources(cfg) if source == "shards" else read_sources(cfg)
    texts = [s.text(cfg.data.sections) for src in sources for s in src.samples if s.has_text]
    tok = train_wordpiece(texts, cfg.model.text.vocab_size)
    method = build_method(cfg, tok)
    opt = build_optimizer(method, cfg.train, torch.device("cpu"))
    sched = build_scheduler(opt, cfg.train)
    pre = Preprocess.from_config(cfg)
    IMAGE_CACHE.configure(cfg.data.image_cache_mb)
    kw = {"batch_size": cfg.data.batch_size, "max_length": cfg.model.text.max_length, "sections": cfg.data.sections,
          "seed": cfg.train.seed, "augment": cfg.data.augment, "paired_labels": cfg.data.paired_labels,
          "num_workers": cfg.data.num_workers}
    classes = read_info(cfg.data.manifest)["classes"]
    if source == "shards":
        stream = ShardStream(sources, pre, tok, classes, shuffle_buffer=cfg.data.shuffle_buffer, **kw)
    else:
        stream = MixedStream(sources, pre, tok, classes, **kw)
    batches = iter(stream)
    method.train()
    waits, computes = [], []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        loss = method(batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(method.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        method.after_optimizer_step(step)
        t2 = time.perf_counter()
        if step >= warmup:
            waits.append(t1 - t0)
            computes.append(t2 - t1)
    wait, compute = sum(waits), sum(computes)
    return {"source": source, "num_workers": cfg.data.num_workers, "shuffle_buffer": cfg.data.shuffle_buffer,
            "batch_size": cfg.data.batch_size, "patch_size": cfg.model.vision.patch_size, "steps": steps,
            "warmup": warmup, "step_s": (wait + compute) / steps, "wait_s": wait / steps,
            "max_wait_s": max(waits), "wait_share": wait / (wait + compute)}


def vm_hwm_mb() -> float:
    """This process's peak RSS (VmHWM). Not ``ru_maxrss``: Linux carries that across exec, so
    a child started from a large parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(data: Path, n_shards: int, per_shard: int) -> None:
    """Write ``n_shards`` shards of ``per_shard`` samples, stream one epoch (decoded), print peak RSS."""
    from medvlp.data.manifest import read_manifest
    from medvlp.data.shards import write_shards
    from medvlp.data.stream import (
        ShardDataset,
        ShardSource,
        part_size,
        read_shard_index,
    )
    from medvlp.data.transforms import Preprocess

    samples = [dataclasses.replace(s, split="all") for s in read_manifest(data)][: n_shards * per_shard]
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(samples, tmp, root=data, shard_size=per_shard)
        folder, index = read_shard_index(tmp)
        src = ShardSource("all", "paired", 1.0, [], [(str(folder / e["file"]), e["rows"]) for e in index])
        ds = ShardDataset([src], Preprocess(224), batch_size=8, seed=0, shuffle_buffer=64)
        before = vm_hwm_mb()
        it = ds.source_records(0, 0, 1)
        for _ in range(part_size(src.rows, rank=0, world=1, worker=0, num_workers=1)):
            ds.decode(0, next(it))
        peak = vm_hwm_mb()
    print(json.dumps({"shards": n_shards, "samples": src.rows, "rss_before_mb": before, "peak_rss_mb": peak}))


def rss_by_shards(data: Path, per_shard: int) -> list[dict]:
    out = []
    for n in (10, 100):
        res = subprocess.run([sys.executable, __file__, "--rss-child", str(n), "--per-shard", str(per_shard),
                              "--data", str(data)], capture_output=True, text=True, check=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


def write_md(res: dict) -> str:
    lines = [f"# Data wait: shards vs PNG folder (v{res['version']})", "",
             f"Command: `{res['command']}`  ", f"Machine: {res['machine']}; {res['date']}", "",
             ("CLIP demo model (configs/experiments/demo.yaml) at 224 px, SynthCXR small preset rendered at 224 px. "
              "Default loader settings unless listed; wait = time in `next(batches)`, share = wait / step."), "",
             "| source | overrides | num_workers | patch | batch | step s | wait s/step | max wait s | wait share |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["runs"]:
        lines.append(f"| {r['source']} | {' '.join(r['overrides']) or '-'} | {r['num_workers']} | {r['patch_size']} | "
                     f"{r['batch_size']} | {r['step_s']:.3f} | {r['wait_s']:.3f} | {r['max_wait_s']:.3f} | "
                     f"{100 * r['wait_share']:.1f} % |")
    lines += ["", "Peak RSS while streaming one epoch (decode included), same shard size:", "",
              "| shards | samples | RSS after imports MiB | peak RSS MiB |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['shards']} | {r['samples']} | {r['rss_before_mb']:.0f} | {r['peak_rss_mb']:.0f} |" for r in res["rss"]]
    if res.get("notes"):
        lines += ["", "Notes:", "", *(f"- {n}" for n in res["notes"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("/tmp/medvlp-data-wait/synth224"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--per-shard", type=int, default=8)
    p.add_argument("--base", default="model.vision.patch_size=16",
                   help="overrides for every run, space-separated (default: 16 px patches, the usual ViT grid at 224 px; "
                        "the demo's 8 px patches make 784 tokens and a step ~30 s on this CPU)")
    p.add_argument("--variant", action="append", default=[],
                   help="extra overrides for a further pair of runs, space-separated (e.g. 'data.num_workers=1')")
    p.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.rss_child is not None:
        return rss_child(args.data, args.rss_child, args.per_shard)
    ensure_data(args.data)
    rss = rss_by_shards(args.data, args.per_shard)
    runs = []
    for variant in ["", *args.variant]:
        overrides = [*args.base.split(), *variant.split()]
        for source in ("png", "shards"):
            r = run_setting(args.data, source, args.steps, args.warmup, overrides)
            r["overrides"] = overrides
            print(json.dumps(r), flush=True)
            runs.append(r)
    res = {"benchmark": BENCHMARK, "version": VERSION, "runs": runs, "rss": rss,
           "command": "OMP_NUM_THREADS=1 python " + shlex.join(["benchmarks/data_wait.py", *(argv or sys.argv[1:])]),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                      "1 thread", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data_wait.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / "data_wait.md").write_text(write_md(res))
    print(write_md(res))


if __name__ == "__main__":
    main()
