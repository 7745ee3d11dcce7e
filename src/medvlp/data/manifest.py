"""Manifests: a dataset is a folder with ``manifest.jsonl`` (one :class:`Sample` per
line, image paths relative to the folder; or ``image: null`` with ``meta.shard`` / ``meta.key``
naming a tar shard member, see :mod:`medvlp.data.shard_access`) and ``dataset.json`` (name, version, class
names, split counts, and the generator or preparation parameters).

Real-data preparers and the synthetic generator write the same format, so training
and evaluation never care where the data came from.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from medvlp.data.sample import LABEL_NAMES, Sample
from medvlp.data.shard_access import resolve_shard
from medvlp.errors import DataError

MANIFEST_NAME = "manifest.jsonl"
INFO_NAME = "dataset.json"
REQUIRED_KEYS = ("id", "subject_id", "study_id", "split")


def resolve_manifest(path: str | os.PathLike) -> Path:
    """Accept a dataset folder or the manifest file itself."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"manifest not found: {path}. Point data.manifest at a dataset folder made by "
            "`medvlp synth` (or a preparer), or at its manifest.jsonl"
        )
    return path


def read_info(path: str | os.PathLike) -> dict:
    info_path = resolve_manifest(path).parent / INFO_NAME
    if not info_path.is_file():
        raise DataError(f"dataset description not found: {info_path} (it lists the class names; regenerate the dataset)")
    return json.loads(info_path.read_text())


def read_manifest(path: str | os.PathLike, splits: Iterable[str] | None = None) -> list[Sample]:
    """Read samples (optionally only some splits); image paths become absolute."""
    path = resolve_manifest(path)
    root = path.parent
    wanted = set(splits) if splits is not None else None
    samples = []
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            missing = [k for k in REQUIRED_KEYS if not row.get(k)]
            if missing:
                raise DataError(f"{path}:{lineno}: missing required field(s) {', '.join(missing)}")
            if wanted is not None and row["split"] not in wanted:
                continue
            for cls, code in (row.get("labels") or {}).items():
                if code not in LABEL_NAMES:
                    raise DataError(
                        f"{path}:{lineno}: label {cls!r} has code {code!r}; allowed codes: "
                        + ", ".join(f"{k} ({v})" for k, v in LABEL_NAMES.items())
                    )
            image = row.get("image")
            meta = dict(row.get("meta") or {})
            if not image and meta.get("shard"):  # prepared data: pixels in shards/<meta.shard>, member <meta.key>.png
                meta["shard_path"] = resolve_shard(root, str(meta["shard"]))
            samples.append(
                Sample(
                    id=str(row["id"]),
                    subject_id=str(row["subject_id"]),
                    study_id=str(row["study_id"]),
                    split=row["split"],
                    image=str(root / image) if image else None,
                    view=row.get("view", ""),
                    findings=row.get("findings", "") or "",
                    impression=row.get("impression", "") or "",
                    labels=dict(row.get("labels") or {}),
                    meta=meta,
                )
            )
    if wanted is not None and not samples:
        raise DataError(f"{path}: no samples in split(s) {sorted(wanted)}; check data.train_split / eval.split")
    return samples


def write_manifest(folder: str | os.PathLike, samples: Iterable[Sample], info: dict) -> Path:
    """Write manifest.jsonl + dataset.json atomically; image paths stored relative to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    counts: dict[str, int] = {}
    for s in samples:
        image = os.path.relpath(s.image, folder) if s.image and os.path.isabs(s.image) else s.image
        rows.append(
            json.dumps(
                {
                    "id": s.id,
                    "subject_id": s.subject_id,
                    "study_id": s.study_id,
                    "split": s.split,
                    "image": image,
                    "view": s.view,
                    "findings": s.findings,
                    "impression": s.impression,
                    "labels": s.labels,
                    "meta": {k: v for k, v in s.meta.items() if k != "shard_path"},  # machine-specific
                },
                sort_keys=True,
            )
        )
        counts[s.split] = counts.get(s.split, 0) + 1
    text = "\n".join(rows) + "\n"
    info = dict(info, split_counts=counts, manifest_sha256=hashlib.sha256(text.encode()).hexdigest())
    _atomic_write(folder / MANIFEST_NAME, text)
    _atomic_write(folder / INFO_NAME, json.dumps(info, indent=2, sort_keys=True) + "\n")
    return folder / MANIFEST_NAME


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
