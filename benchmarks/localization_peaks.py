"""Where do a model's localisation maps peak? A diagnostic for maps that ignore the finding.

For the final checkpoint of each ``<recipe>-seed<N>`` cell of a grid, the sentence map of
``docs/evaluation.md`` (cosine between projected patch tokens and a class's positive prompt
ensemble) is computed for the first ``--images`` test images that have a finding mask and for
every class in ``--classes`` (every image x class map, positive or not), and the patch where each
map peaks is counted. Reported per cell: the share of maps that peak on the single most frequent
patch (1 / 64 = 0.016 if peaks were spread evenly over an 8 x 8 grid; 1.0 if every map peaks on
the same patch whatever the image and class) and that patch's (row, column), 1-based.

    OMP_NUM_THREADS=1 python benchmarks/localization_peaks.py \\
        --grid benchmark-runs/synthcxr-standard-v1-label --cells clip-seed0,gloria-seed0 --name localization-peaks-label

Results: ``benchmarks/results/<name>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CLASSES = "Cardiomegaly,Pleural Effusion,Consolidation,Nodule"


@torch.no_grad()
def peaks(run: Path, dataset: str, classes: list[str], images: int) -> dict:
    from medvlp.data.loader import make_loader
    from medvlp.data.manifest import read_manifest
    from medvlp.eval.prompts import load_prompts
    from medvlp.eval.runner import make_text_encoder
    from medvlp.eval.zeroshot import class_prompt_embeddings
    from medvlp.hub import load_bundle

    b = load_bundle(run / "train")
    test = [s for s in read_manifest(dataset, ["test"]) if s.meta.get("mask")][:images]
    table = load_prompts(None, b.classes)
    pos, _ = class_prompt_embeddings(make_text_encoder(b.method, b.tokenizer, b.cfg), classes,
                                     {c: table[c] for c in classes})
    counts: collections.Counter = collections.Counter()
    grid = None
    for batch in make_loader(test, b.cfg, b.tokenizer, b.classes, batch_size=64):
        patches = b.method.patch_embeddings(batch.images)
        grid = int(patches.shape[1] ** 0.5)
        counts.update(torch.einsum("bnd,kd->bkn", patches.float(), pos.float()).argmax(-1).flatten().tolist())
    top, n_top = counts.most_common(1)[0]
    return {"maps": sum(counts.values()), "top_share": n_top / sum(counts.values()),
            "top_patch_row_col": [top // grid + 1, top % grid + 1], "grid": grid,
            "distinct_peak_patches": len(counts)}


def main(argv: list[str] | None = None) -> int:
    from medvlp.bench import machine_info, machine_label, utc_now

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", required=True)
    ap.add_argument("--cells", required=True, help="comma-separated <recipe>-seed<N> folders under <grid>/runs")
    ap.add_argument("--dataset", default="/work/bench/standard-v1")
    ap.add_argument("--classes", default=CLASSES)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--name", required=True)
    args = ap.parse_args(argv)
    classes = args.classes.split(",")
    rows = {}
    for cell in args.cells.split(","):
        rows[cell] = peaks(Path(args.grid) / "runs" / cell, args.dataset, classes, args.images)
        print(cell, rows[cell], flush=True)
    command = "python benchmarks/localization_peaks.py " + " ".join(argv if argv is not None else sys.argv[1:])
    data = {"benchmark": "localization_peaks", "version": 1, "command": command, "date": utc_now(),
            "machine": machine_info(), "classes": classes, "images": args.images, "cells": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(data, indent=1) + "\n")
    lines = [f"# Where localisation maps peak ({args.grid})", "", f"Command: `{command}`  ",
             f"Machine: {machine_label(data['machine'])}  ", f"Date: {data['date']}", "",
             f"Sentence maps of the first {args.images} masked test images x {len(classes)} classes "
             f"({', '.join(classes)}).", "",
             "| cell | maps | share peaking on the most frequent patch | that patch (row, col) | distinct peak patches |",
             "|---|---:|---:|---|---:|"]
    for cell, r in rows.items():
        lines.append(f"| {cell} | {r['maps']} | {r['top_share']:.3f} | {tuple(r['top_patch_row_col'])} | "
                     f"{r['distinct_peak_patches']} of {r['grid'] ** 2} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
