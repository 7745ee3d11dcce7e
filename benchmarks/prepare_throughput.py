"""`medvlp prepare` throughput: images per second for large JPG and 12-bit DICOM inputs.

Writes ``--images`` synthetic chest-like images of ``--source-size`` px twice: as 8-bit JPG
(quality 95) and as 12-bit MONOCHROME2 DICOM (16 bits allocated, written with pydicom), each
with a folder-importer CSV (path, subject_id). Then runs the real pipeline
(:func:`medvlp.data.prepare.prepare`, ``folder`` importer, resize to ``--image-size``, 8-bit PNG
for JPG, 16-bit PNG for the DICOMs, shards + manifest) with 1 and 2 worker processes, into a
fresh output folder each time. The time covers enumeration, decoding, resizing, PNG encoding,
shard writing and the final manifest (what a user waits for). Writes
``benchmarks/results/prepare_throughput.json`` and ``.md``.

    OMP_NUM_THREADS=1 python benchmarks/prepare_throughput.py --images 100
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

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _pattern(size: int, seed: int) -> np.ndarray:
    """A smooth, chest-like float image in [0, 1] plus mild noise (random noise alone is unrealistic
    for JPG / PNG coders: it neither compresses nor decodes like a radiograph)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    lungs = np.exp(-(((x - 0.32) / 0.16) ** 2 + ((y - 0.5) / 0.3) ** 2)) + np.exp(
        -(((x - 0.68) / 0.16) ** 2 + ((y - 0.5) / 0.3) ** 2))
    ribs = 0.08 * np.sin(y * 60 + 3 * np.sin(x * 6 + seed))
    img = 0.75 - 0.5 * lungs + ribs + 0.02 * rng.standard_normal((size, size), dtype=np.float32)
    return np.clip(img, 0, 1)


def _write_dicom12(path: Path, arr: np.ndarray, patient_id: str) -> None:
    """An uncompressed 12-bit (16 allocated) MONOCHROME2 radiograph DICOM."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import (
        DigitalXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = DigitalXRayImageStorageForPresentation, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality, ds.PhotometricInterpretation = patient_id, "DX", "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_inputs(work: Path, n: int, size: int) -> dict[str, Path]:
    from PIL import Image

    roots = {"jpg": work / "jpg", "dicom": work / "dicom"}
    for kind, root in roots.items():
        root.mkdir(parents=True, exist_ok=True)
        lines = ["path,subject_id"]
        for i in range(n):
            img = _pattern(size, i)
            if kind == "jpg":
                name = f"img/{i:04d}.jpg"
                (root / "img").mkdir(exist_ok=True)
                Image.fromarray((img * 255).astype(np.uint8)).save(root / name, quality=95)
            else:
                name = f"img/{i:04d}.dcm"
                (root / "img").mkdir(exist_ok=True)
                _write_dicom12(root / name, (img * 4095).astype(np.uint16), f"p{i}")
            lines.append(f"{name},s{i}")
        (root / "list.csv").write_text("\n".join(lines) + "\n")
    return roots


def measure(kind: str, root: Path, out: Path, workers: int, image_size: int) -> dict:
    from medvlp.data.prepare import prepare

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = prepare("folder", root, out, image_size=image_size, workers=workers, progress=False,
                  options={"csv": "list.csv"})
    seconds = time.perf_counter() - t0
    input_mb = sum(p.stat().st_size for p in (root / "img").iterdir()) / 2**20
    shard_mb = sum(p.stat().st_size for p in (out / "shards").glob("*.tar")) / 2**20
    shutil.rmtree(out, ignore_errors=True)
    return {"input": kind, "workers": workers, "images": res.rows, "quarantined": res.quarantined,
            "seconds": round(seconds, 2), "images_per_s": round(res.rows / seconds, 2),
            "input_mb": round(input_mb, 1), "shard_mb": round(shard_mb, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--source-size", type=int, default=2048)
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed afterwards)")
    args = ap.parse_args(argv)
    from medvlp.bench import machine_info

    work = Path(args.work or tempfile.mkdtemp(prefix="prepare-throughput-"))
    t0 = time.perf_counter()
    roots = write_inputs(work, args.images, args.source_size)
    print(f"inputs written in {time.perf_counter() - t0:.0f} s")
    load_before = os.getloadavg()
    rows = []
    for kind, root in roots.items():
        for workers in args.workers:
            row = measure(kind, root, work / "out", workers, args.image_size)
            print(f"{kind}: {workers} worker(s) {row['images_per_s']:.2f} images/s ({row['seconds']:.1f} s)")
            rows.append(row)
    load_after = os.getloadavg()
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    command = "OMP_NUM_THREADS=1 python benchmarks/prepare_throughput.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    result = {"benchmark": {"name": "prepare_throughput", "version": 1}, "command": command.strip(),
              "machine": machine_info(), "load_average_1_5_15": {"before": load_before, "after": load_after},
              "settings": {"images": args.images, "source_size": args.source_size, "image_size": args.image_size,
                           "bit_depth": "auto", "shard_size": 1000, "importer": "folder"},
              "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prepare_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    dirty = " (dirty)" if m["git_dirty"] else ""
    machine = f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, commit {m['git_commit'][:10]}{dirty}"
    what = (f"{args.images} images of {args.source_size} x {args.source_size} px per input kind, resized to "
            f"{args.image_size} px (longest side, bicubic) and written as PNG into tar shards with the manifest "
            "(folder importer). JPG: 8-bit, quality 95 -> 8-bit PNG. DICOM: 12-bit MONOCHROME2, 16 bits "
            "allocated, uncompressed -> 16-bit PNG. Time = the whole `prepare` call, pool start-up included.")
    before, after = (" / ".join(f"{v:.1f}" for v in load) for load in (load_before, load_after))
    shared = (f"**The machine was shared**: other jobs were running (1/5/15-min load average {before} before, "
              f"{after} after, on {m['cores']} cores), so these numbers are lower bounds, and "
              "with the second core busy the 1- vs 2-worker rows say little about the speed-up on an idle machine.")
    lines = ["# `medvlp prepare` throughput", "", f"Command: `{result['command']}`  ",
             f"{machine}; {result['finished_at']}", "", what, "", shared, "",
             "| input | workers | images | seconds | images/s | input MB | shard MB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['input']} | {r['workers']} | {r['images']} | {r['seconds']:.1f} | {r['images_per_s']:.2f} | "
              f"{r['input_mb']:.0f} | {r['shard_mb']:.1f} |" for r in rows]
    (RESULTS / "prepare_throughput.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
