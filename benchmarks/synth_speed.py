"""SynthCXR generation speed: images per second per core at 128 px and 224 px.

Generates a fixed number of subjects with one worker process (so the number is per core)
at each image size, PNGs and masks included (what ``medvlp synth`` writes), and once with
all cores to show the parallel speed-up. Writes ``benchmarks/results/synth_speed.json`` and
``synth_speed.md``.

    python benchmarks/synth_speed.py --subjects 150
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from demo_quality import machine

RESULTS = HERE / "results"


def measure(size: int, subjects: int, workers: int, work: Path) -> dict:
    from medvlp.data.manifest import read_manifest
    from medvlp.data.synth import GENERATOR_VERSION, generate

    out = work / f"s{size}-w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    generate(out, subjects=subjects, image_size=size, seed=0, workers=workers, progress=False)
    seconds = time.perf_counter() - t0
    images = len(read_manifest(out))
    shutil.rmtree(out, ignore_errors=True)
    return {"image_size": size, "workers": workers, "subjects": subjects, "images": images, "seconds": seconds,
            "images_per_s": images / seconds, "images_per_s_per_worker": images / seconds / workers,
            "generator_version": GENERATOR_VERSION}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=150)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="synth-speed-"))
    cores = os.cpu_count() or 1
    rows = []
    for size in args.sizes:
        for workers in sorted({1, cores}):
            row = measure(size, args.subjects, workers, work)
            print(f"{size} px, {workers} worker(s): {row['images_per_s']:.1f} images/s "
                  f"({row['images_per_s_per_worker']:.1f} per worker)")
            rows.append(row)
    command = "python benchmarks/synth_speed.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    result = {"benchmark": {"name": "synth_speed", "version": 1}, "command": command.strip(), "machine": machine(),
              "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "synth_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# SynthCXR generation speed (generator {rows[0]['generator_version']})", "",
             f"Command: `{result['command']}`  ", f"Machine: {result['machine']['cpu']}, {cores} cores, "
             f"torch {result['machine']['torch']}; {result['finished_at']}", "",
             "PNG images + 16-bit mask images + manifest, one subject = 1-4 studies.", "",
             "| image size | workers | images | seconds | images/s | images/s per worker |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['image_size']} | {r['workers']} | {r['images']} | {r['seconds']:.1f} | "
                     f"{r['images_per_s']:.1f} | {r['images_per_s_per_worker']:.1f} |")
    (RESULTS / "synth_speed.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
