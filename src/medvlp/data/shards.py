"""Webdataset-style tar shards: write and read back samples of a manifest.

A shard is a plain tar file; the members of one sample share a key (its id, with ``.`` and
``/`` replaced so the key has no extension-like dots) and differ by extension:
``<key>.png`` (the image bytes as stored), ``<key>.json`` (the manifest row, image path
removed) and, when the sample has one, ``<key>.mask.png``. This is the layout webdataset
and similar streaming readers expect (members of a sample are contiguous).

Shards are written per split (``<prefix>-<split>-000000.tar``), at most ``shard_size``
samples each, in manifest order; each shard is written to a temporary name and renamed,
so an interrupted run leaves no half-written shard. ``shards.json`` lists every shard
with its split, row count and SHA-256.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from medvlp.data.sample import Sample
from medvlp.errors import DataError

INDEX_NAME = "shards.json"


def sample_key(sample_id: str) -> str:
    return sample_id.replace(".", "_").replace("/", "_")


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic bytes: same samples, same shard
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _row(sample: Sample) -> dict:
    return {"id": sample.id, "subject_id": sample.subject_id, "study_id": sample.study_id, "split": sample.split,
            "view": sample.view, "findings": sample.findings, "impression": sample.impression,
            "labels": sample.labels, "meta": sample.meta}


def write_shards(samples: Sequence[Sample], out: str | os.PathLike, *, root: str | os.PathLike,
                 shard_size: int = 1000, prefix: str = "shard") -> list[dict]:
    """Write ``samples`` into tar shards under ``out``; returns the shard index entries.

    ``root`` is the dataset folder: a sample's mask (``meta["mask"]``) is relative to it.
    """
    if shard_size < 1:
        raise DataError(f"shard_size must be >= 1, got {shard_size}")
    out, root = Path(out), Path(root)
    out.mkdir(parents=True, exist_ok=True)
    by_split: dict[str, list[Sample]] = {}
    for s in samples:
        by_split.setdefault(s.split, []).append(s)
    index: list[dict] = []
    for split, rows in by_split.items():
        for n, start in enumerate(range(0, len(rows), shard_size)):
            name = f"{prefix}-{split}-{n:06d}.tar"
            tmp = out / (name + ".tmp")
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for s in rows[start:start + shard_size]:
                    key = sample_key(s.id)
                    if not s.image or not os.path.isfile(s.image):
                        raise DataError(f"{s.id}: image {s.image!r} is missing; regenerate the dataset")
                    _add_bytes(tar, f"{key}.png", Path(s.image).read_bytes())
                    mask = s.meta.get("mask")
                    if mask:
                        _add_bytes(tar, f"{key}.mask.png", (root / mask).read_bytes())
                    _add_bytes(tar, f"{key}.json", json.dumps(_row(s), sort_keys=True).encode())
            os.replace(tmp, out / name)
            digest = hashlib.sha256((out / name).read_bytes()).hexdigest()
            index.append({"file": name, "split": split, "rows": len(rows[start:start + shard_size]), "sha256": digest})
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return index


def iter_shard(path: str | os.PathLike) -> Iterator[dict[str, bytes]]:
    """Samples of one shard as ``{"__key__": key, "<ext>": bytes, ...}`` dicts, in order."""
    current: dict[str, bytes] | None = None
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}  # type: ignore[dict-item]
            data = tar.extractfile(member)
            current[ext] = data.read() if data else b""
    if current is not None:
        yield current


def iter_shards(paths: Iterable[str | os.PathLike]) -> Iterator[dict[str, bytes]]:
    for p in paths:
        yield from iter_shard(p)
