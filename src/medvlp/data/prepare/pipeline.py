"""The shared preparation pipeline: records -> resized images in tar shards + manifest.

:func:`prepare` takes any :class:`~medvlp.data.prepare.base.Preparer` and writes, under ``out``:

* ``shards/<source>-<split>-<chunk>.tar``: webdataset-style members ``<key>.png`` (the image,
  resized once so its longest side is ``image_size``; 8-bit PNG, 16-bit for >8-bit sources
  with ``bit_depth="auto"``), ``<key>.json`` (the manifest row) and, for records with a mask,
  ``<key>.mask.png`` (:mod:`~medvlp.data.prepare.targets`), plus ``shards/shards.json``
  (file, split, rows, SHA-256 per shard: the same index as :mod:`medvlp.data.shards`);
* ``manifest.jsonl`` (one row per kept image; ``image`` is null, ``meta.shard`` / ``meta.key``
  locate it) and ``dataset.json`` (classes, settings, split counts, checksums, quarantine counts);
* ``quarantine.jsonl``: one line per record left out (id, file, reason, detail).

Records are cut, in enumeration order, into chunks of ``shard_size``; each chunk is processed
by a worker pool (``imap``, ordered) and written as soon as it is complete: its shards first
(temp name + rename), then ``.prepare/chunk-<n>.json`` listing its rows. A rerun skips every
chunk whose state file matches, so an interrupted run resumes and ends with the same bytes as
an uninterrupted one. Bad samples never stop the run: they are quarantined and counted.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import re
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medvlp.data.prepare.base import (
    Preparer,
    RawRecord,
    keyed_hash,
    require_subject_key,
    resolve_subject_key,
    split_by_subject,
)
from medvlp.data.prepare.targets import apply_targets, resized_hw
from medvlp.errors import ConfigError, DataError

log = logging.getLogger("medvlp.prepare")
STATE_DIR = ".prepare"
QUARANTINE_NAME = "quarantine.jsonl"
BIT_DEPTHS = ("auto", "8")
_KEY_CHECK = "medvlp-subject-key-check"


@dataclass
class PrepareResult:
    """What a run did (timings are here, never in dataset.json, so reruns stay byte-identical)."""

    out: Path
    rows: int
    quarantined: int
    processed: int  # records read in this run (resumed chunks are not counted)
    resumed_chunks: int
    seconds: float
    quarantine_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else float("nan")


def prepare(preparer: Preparer | str, root: str | os.PathLike | None, out: str | os.PathLike, *,
            image_size: int = 512, workers: int = 0, shard_size: int = 1000, key: str | None = None,
            progress: bool = True, bit_depth: str = "auto", options: dict[str, Any] | None = None) -> PrepareResult:
    """Prepare a dataset. ``preparer``: an instance, or a registered name built with ``root`` and ``options``.

    ``workers``: 0 or 1 = in this process, N = a pool of N processes. ``key``: the subject-hash
    key (else ``$MEDVLP_SUBJECT_KEY``), required only when a record has no dataset subject id.
    """
    if isinstance(preparer, str):
        from medvlp.data.prepare import PREPARERS

        if root is None:
            raise ConfigError(f"prepare {preparer}: --root is required (the downloaded dataset folder)")
        preparer = PREPARERS.get(preparer)(root, **(options or {}))
    if image_size < 8:
        raise ConfigError(f"--image-size {image_size}: use at least 8 pixels (512 is the usual choice)")
    if shard_size < 1:
        raise ConfigError(f"--shard-size {shard_size}: use at least 1 sample per shard (1000 is the default)")
    if bit_depth not in BIT_DEPTHS:
        raise ConfigError(f"bit_depth={bit_depth!r}: use one of {', '.join(BIT_DEPTHS)}")
    out = Path(out)
    start = time.perf_counter()
    records = list(preparer.records())
    if not records:
        raise DataError(f"{preparer.root}: the {preparer.name} preparer found no images; check --root and the "
                        f"dataset layout in docs/data/{preparer.name}.md")
    _check_unique(records, preparer.root)
    secret = resolve_subject_key(key)
    if any(r.needs_subject_key for r in records):
        require_subject_key(secret, f"prepare {preparer.name} ({preparer.root})")
    settings = {"image_size": image_size, "shard_size": shard_size, "bit_depth": bit_depth, **preparer.info(),
                "key_check": keyed_hash(secret, _KEY_CHECK) if secret else None}
    state = out / STATE_DIR
    _check_settings(state, settings, out)
    chunks = [records[i:i + shard_size] for i in range(0, len(records), shard_size)]
    fingerprints = [_fingerprint(c) for c in chunks]
    pending = [n for n, c in enumerate(chunks) if not _chunk_done(state, n, fingerprints[n])]
    job = _Job(str(preparer.root), image_size, bit_depth, secret)
    tasks = ((n, r) for n in pending for r in chunks[n])
    done_rows = sum(len(c) for n, c in enumerate(chunks) if n not in set(pending))
    from tqdm.auto import tqdm

    bar = tqdm(total=len(records), initial=done_rows, desc=f"prepare {preparer.name}", unit="img",
               disable=not progress)
    buffers: dict[int, list[dict]] = {}
    processed = 0
    try:
        for n, result in _run(job, tasks, workers):
            buffers.setdefault(n, []).append(result)
            processed += 1
            bar.update(1)
            if len(buffers[n]) == len(chunks[n]):
                _write_chunk(out, preparer.name, n, buffers.pop(n), fingerprints[n])
    finally:
        bar.close()
    rows, quarantine, shards = _collect(state, len(chunks))
    reasons = Counter(q["reason"] for q in quarantine)
    _finalize(out, preparer, settings, rows, quarantine, shards, reasons)
    if quarantine:
        log.warning("%s: %d record(s) quarantined (%s); see %s", preparer.name, len(quarantine),
                    ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())), out / QUARANTINE_NAME)
    return PrepareResult(out, len(rows), len(quarantine), processed, len(chunks) - len(pending),
                         time.perf_counter() - start, dict(reasons))


# -- worker side ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Job:
    root: str
    image_size: int
    bit_depth: str
    secret: bytes | None


_JOB: _Job | None = None


def _init_worker(job: _Job) -> None:
    global _JOB
    _JOB = job


def _run(job: _Job, tasks, workers: int):
    """(chunk, result) pairs in task order: in-process for workers <= 1, else a process pool."""
    if workers <= 1:
        _init_worker(job)
        for task in tasks:
            yield _process(task)
        return
    # fork starts workers without re-importing the package; spawn where fork does not exist
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
        yield from pool.imap(_process, tasks, chunksize=4)


def _process(task: tuple[int, RawRecord]) -> tuple[int, dict]:
    n, rec = task
    job = _JOB
    try:
        return n, _process_record(rec, job)
    except _Skip as skip:
        detail = str(skip.detail).replace(job.root.rstrip("/") + "/", "")
        return n, {"quarantine": {"id": rec.id, "file": rec.image, "reason": skip.reason, "detail": detail}}


class _Skip(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _process_record(rec: RawRecord, job: _Job) -> dict:
    from medvlp.data.images import detect_format, read_image_with_info

    if rec.problem:
        raise _Skip(*rec.problem)
    root = Path(job.root)
    path = root / rec.image
    if not path.is_file():
        raise _Skip("missing_file", f"image {rec.image} not found under the dataset root")
    findings, impression, labels, extra = _report(rec, root)
    try:
        kind = detect_format(path)
        arr, info = read_image_with_info(path, out="uint8" if kind == "jpeg" else "float")
    except DataError as exc:
        raise _Skip("unreadable", str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a corrupt file may fail deep inside a decoder
        raise _Skip("unreadable", f"{rec.image}: {type(exc).__name__}: {exc}") from None
    subject, study = rec.subject_id, rec.study_id
    if subject is None:
        if kind != "dicom":
            raise _Skip("no_subject", f"{rec.image}: no subject id given and not a DICOM with a PatientID")
        subject, study = _dicom_ids(path, job.secret, study)
    png, bits = _encode(arr, job.image_size, sixteen=job.bit_depth == "auto" and info.bits > 8)
    meta = dict(rec.meta, orig_size=list(arr.shape[:2]), bits=bits, format=info.format)
    try:  # boxes follow the resize, masks are rendered and resized with it (prepare/targets.py)
        members = apply_targets(rec, meta, arr.shape[:2], job.image_size, _key(rec.id))
    except DataError as exc:
        raise _Skip("bad_target", str(exc)) from None
    if info.tags:
        meta["dicom"] = info.tags  # allow-listed technical tags only (medvlp.data.images.TECHNICAL_TAGS)
    meta.update(extra)
    row = {"id": rec.id, "subject_id": subject, "study_id": study or subject,
           "split": rec.split or split_by_subject(subject), "view": rec.view or str(info.tags.get("ViewPosition", "")),
           "findings": findings, "impression": impression, "labels": labels or {}, "meta": meta}
    return {"row": row, "png": png, "members": members}


def _report(rec: RawRecord, root: Path) -> tuple[str, str, dict | None, dict]:
    """(findings, impression, labels, extra meta); an expected but empty report is skipped."""
    from medvlp.data.reports import (
        clean_text,
        extract_sections,
        label_report,
        report_text,
    )

    text = rec.report
    if rec.report_file is not None:
        try:
            text = (root / rec.report_file).read_text(encoding="utf-8", errors="replace")
        except OSError:
            raise _Skip("missing_report", f"report {rec.report_file} not found under the dataset root") from None
    if text is None and rec.sections is None:
        return "", "", rec.labels, {}
    sections = extract_sections(text) if rec.sections is None else {
        k: clean_text(v) for k, v in rec.sections.items() if v and clean_text(v)}
    labels = rec.labels
    if labels is None:
        labels = label_report(sections)
        empty = labels is None
    else:
        empty = not re.search(r"[A-Za-z0-9]", report_text({k: clean_text(v, "") for k, v in sections.items()}))
    if empty:
        raise _Skip("empty_report", f"{rec.report_file or rec.id}: empty report (no text once de-identification "
                                    "placeholders are removed)")
    findings, impression = sections.get("findings", ""), sections.get("impression", "")
    if not findings and not impression:
        findings = report_text(sections)  # headerless report: its body is the finding text
    others = {k: v for k, v in sections.items() if k not in ("findings", "impression", "preamble")}
    return findings, impression, labels, ({"sections": others} if others else {})


def _dicom_ids(path: Path, secret: bytes | None, study: str | None) -> tuple[str, str | None]:
    """Keyed hashes of PatientID (and StudyInstanceUID): the raw values never leave this function."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID", "StudyInstanceUID"], force=True)
    patient = str(ds.get("PatientID", "") or "").strip()
    if not patient:
        raise _Skip("no_subject", f"{path.name}: DICOM without PatientID and no subject id given")
    if study is None:
        uid = str(ds.get("StudyInstanceUID", "") or "").strip()
        study = "st-" + keyed_hash(secret, uid) if uid else None
    return "s-" + keyed_hash(secret, patient), study


def _encode(arr: np.ndarray, size: int, sixteen: bool) -> tuple[bytes, int]:
    """Quantise, resize (longest side -> size, never upscaled) and PNG-encode. Returns (bytes, bits)."""
    from PIL import Image

    sixteen = sixteen and arr.ndim == 2  # PIL has no 16-bit RGB
    if arr.dtype != np.uint8 or sixteen:
        x = arr.astype(np.float32) / (np.iinfo(arr.dtype).max if arr.dtype.kind == "u" else 1.0)
        top, dtype = (65535, np.uint16) if sixteen else (255, np.uint8)
        arr = np.rint(np.clip(x, 0, 1) * top).astype(dtype)
    img = Image.fromarray(arr)
    h, w = arr.shape[:2]
    if max(h, w) > size:
        nh, nw = resized_hw(h, w, size)
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=3)  # level 3: ~2x faster than 6 for a few % more bytes
    return buf.getvalue(), 16 if sixteen else 8


# -- main-process side: chunks, state, final files ------------------------------------------------
def _key(sample_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", sample_id)  # no dots: webdataset splits keys at the first dot


def _write_chunk(out: Path, prefix: str, n: int, results: list[dict], fingerprint: str) -> None:
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    by_split: dict[str, list[dict]] = {}
    quarantine = []
    for res in results:
        if "quarantine" in res:
            quarantine.append(res["quarantine"])
        else:
            by_split.setdefault(res["row"]["split"], []).append(res)
    rows, shards = [], []
    for split, items in by_split.items():
        name = f"{prefix}-{split}-{n:06d}.tar"
        tmp = shard_dir / (name + ".tmp")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for res in items:
                row = res["row"]
                key = _key(row["id"])
                row["meta"].update(shard=name, key=key)
                _add(tar, f"{key}.png", res["png"])
                for ext, data in res.get("members", {}).items():  # e.g. mask.png
                    _add(tar, f"{key}.{ext}", data)
                _add(tar, f"{key}.json", json.dumps(row, sort_keys=True).encode())
                rows.append(row)
        os.replace(tmp, shard_dir / name)
        digest = hashlib.sha256((shard_dir / name).read_bytes()).hexdigest()
        shards.append({"file": name, "split": split, "rows": len(items), "sha256": digest})
    state = {"fingerprint": fingerprint, "rows": rows, "quarantine": quarantine, "shards": shards}
    _atomic_write(out / STATE_DIR / f"chunk-{n:06d}.json", json.dumps(state, sort_keys=True))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))  # mtime 0, no owner: same samples, same bytes


def _fingerprint(chunk: list[RawRecord]) -> str:
    return hashlib.sha256("\n".join(f"{r.id}\t{r.image}" for r in chunk).encode()).hexdigest()


def _chunk_done(state: Path, n: int, fingerprint: str) -> bool:
    path = state / f"chunk-{n:06d}.json"
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return saved.get("fingerprint") == fingerprint and all(
        (path.parent.parent / "shards" / s["file"]).is_file() for s in saved.get("shards", []))


def _check_settings(state: Path, settings: dict, out: Path) -> None:
    path = state / "run.json"
    text = json.dumps(settings, sort_keys=True, indent=1)
    if path.is_file() and path.read_text() != text:
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        hint = " (a different --subject-key)" if "key_check" in diff else ""
        raise ConfigError(f"{out} holds a preparation with other settings: {', '.join(diff)} differ{hint}. "
                          "Resume with the same settings, or choose a new --out (or delete the folder).")
    if not path.is_file() and out.is_dir() and any(out.iterdir()) and not state.is_dir():
        raise ConfigError(f"--out {out}: folder exists and is not a medvlp prepare output; choose an empty or new folder.")
    _atomic_write(path, text)


def _collect(state: Path, n_chunks: int) -> tuple[list[dict], list[dict], list[dict]]:
    rows, quarantine, shards = [], [], []
    for n in range(n_chunks):
        saved = json.loads((state / f"chunk-{n:06d}.json").read_text())
        rows += saved["rows"]
        quarantine += saved["quarantine"]
        shards += saved["shards"]
    return rows, quarantine, shards


def _finalize(out: Path, preparer: Preparer, settings: dict, rows: list[dict], quarantine: list[dict],
              shards: list[dict], reasons: Counter) -> None:
    from medvlp.data.synth.findings import CLASSES

    manifest = "".join(json.dumps(dict(r, image=None), sort_keys=True) + "\n" for r in rows)
    index = json.dumps(shards, indent=2) + "\n"
    counts = Counter(r["split"] for r in rows)
    info = {"name": preparer.name, "classes": list(CLASSES), "version": preparer.version,
            "source": preparer.info(), "prepare": {k: settings[k] for k in ("image_size", "shard_size", "bit_depth")},
            "subject_ids": "hmac-sha256" if settings["key_check"] else "dataset",
            "rows": len(rows), "split_counts": dict(sorted(counts.items())),
            "subjects": len({r["subject_id"] for r in rows}),
            "enumeration": dict(sorted(getattr(preparer, "stats", {}).items())),  # e.g. views filtered out
            "manifest_sha256": hashlib.sha256(manifest.encode()).hexdigest(),
            "shards": {"index": "shards/shards.json", "count": len(shards), "rows": sum(s["rows"] for s in shards),
                       "index_sha256": hashlib.sha256(index.encode()).hexdigest()},
            "quarantine": {"file": QUARANTINE_NAME, "total": len(quarantine), "reasons": dict(sorted(reasons.items()))}}
    (out / "shards").mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "shards" / "shards.json", index)
    _atomic_write(out / QUARANTINE_NAME, "".join(json.dumps(q, sort_keys=True) + "\n" for q in quarantine))
    _atomic_write(out / "manifest.jsonl", manifest)
    _atomic_write(out / "dataset.json", json.dumps(info, indent=2, sort_keys=True) + "\n")


def _check_unique(records: list[RawRecord], root: Path) -> None:
    dup = [k for k, v in Counter(r.id for r in records).items() if v > 1]
    if dup:
        raise DataError(f"{root}: {len(dup)} record id(s) appear more than once (e.g. {dup[0]!r}); ids must be "
                        "unique: check the CSV for repeated rows or give an id column.")


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

