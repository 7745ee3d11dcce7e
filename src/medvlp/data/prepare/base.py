"""The preparer contract: a dataset-specific :class:`Preparer` yields :class:`RawRecord` s.

A preparer only knows its dataset's layout: which CSVs to read, where images and reports
live, which ids the dataset provides. Everything else -- reading and resizing images,
report parsing and labelling, shards, manifest, quarantine, resume, privacy -- is the shared
pipeline's job (:func:`medvlp.data.prepare.pipeline.prepare`). Records are enumerated in the
main process in a deterministic order (sorted CSV rows / file names): resume relies on it.

Helpers shared by preparers live here too: CSV reading (plain or ``.gz``) with a clear error
for missing columns, CheXpert-style label parsing, the keyed subject hash and the
subject-hash split.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import gzip
import hashlib
import hmac
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from medvlp.errors import ConfigError, DataError

KEY_ENV = "MEDVLP_SUBJECT_KEY"
DEFAULT_SPLIT_FRACTIONS = (("train", 0.8), ("val", 0.1), ("test", 0.1))
# Project label codes (medvlp.data.sample); repeated as literals so that building the CLI
# parser does not import torch. tests/test_prepare.py checks they agree with sample.py.
POSITIVE, NEGATIVE, UNCERTAIN, MISSING = 1, 0, -1, -2
_LABEL_WORDS = {"1": POSITIVE, "1.0": POSITIVE, "positive": POSITIVE, "0": NEGATIVE, "0.0": NEGATIVE,
                "negative": NEGATIVE, "-1": UNCERTAIN, "-1.0": UNCERTAIN, "uncertain": UNCERTAIN,
                "": MISSING, "-2": MISSING, "missing": MISSING, "nan": MISSING}


@dataclass
class RawRecord:
    """One image as the dataset describes it, before any pixel is read.

    ``image``: path relative to the preparer's root (or absolute). ``subject_id`` /
    ``study_id``: the dataset's own de-identified ids; ``subject_id=None`` on a DICOM asks the
    pipeline for the keyed hash of its PatientID (and of its StudyInstanceUID when
    ``study_id`` is None too). ``split``: None -> assigned by subject hash.
    ``report``: free text (sections extracted by medvlp.data.reports), or ``report_file``
    (relative path read in the worker), or ``sections`` already split; all None -> an
    image-only record. ``labels``: class -> code; None with a report -> the project's
    labeller. ``problem``: (reason, detail) found while enumerating (e.g. a label value
    outside the allowed codes): the record goes to the quarantine list unread. ``mask``: a
    picklable callable ``(height, width) -> uint16`` class-bit mask, rendered in the worker at
    the original size and resized with the image (:mod:`medvlp.data.prepare.targets`; boxes in
    ``meta["findings"]`` are given in original pixels and rescaled there too).
    """

    id: str
    image: str
    study_id: str | None = None
    subject_id: str | None = None
    split: str | None = None
    view: str = ""
    report: str | None = None
    report_file: str | None = None
    sections: dict[str, str] | None = None
    labels: dict[str, int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    problem: tuple[str, str] | None = None
    mask: Any = None

    @property
    def needs_subject_key(self) -> bool:
        return self.subject_id is None


class Preparer:
    """Base class: subclass, set ``name`` / ``description``, implement :meth:`records`.

    ``options`` (keyword arguments of ``__init__``) are dataset-specific settings; the CLI
    builds them from the flags added by :meth:`add_arguments` through :meth:`options_from_args`.
    They are recorded in dataset.json and in the resume state (changing them invalidates it).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    version: ClassVar[str] = "1"

    def __init__(self, root: str | os.PathLike, **options: Any):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise ConfigError(f"--root {self.root}: folder not found; point --root at the downloaded "
                              f"{self.name or 'dataset'} folder (see docs/data/).")
        self.options = options

    def records(self) -> Iterator[RawRecord]:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """What dataset.json records about this source (name, version, options)."""
        return {"source": self.name, "preparer_version": self.version, "options": _jsonable(self.options)}

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Dataset-specific CLI flags (the common ones are added by the CLI)."""

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        return {}


# -- CSV helpers ---------------------------------------------------------------------------------
@contextlib.contextmanager
def gc_paused():
    """Pause the cyclic GC while building large lists of rows: the objects are all live, and the
    collector's repeated full passes otherwise cost about as much as parsing (MIMIC: 377k rows)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def find_file(root: Path, names: Sequence[str], what: str, fix: str) -> Path:
    """The first of ``names`` (relative to root; .gz variants tried too) that exists."""
    for name in names:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise ConfigError(f"{what}: none of {', '.join(names)} (or .gz) found under {root}. {fix}")


def find_dir(root: Path, names: Sequence[str], what: str) -> str:
    """The first of ``names`` that is a folder under root (its name); none stops with the names tried."""
    found = next((d for d in names if (root / d).is_dir()), None)
    if found is None:
        raise ConfigError(f"--root {root}: no {' or '.join(names)} folder of {what}")
    return found


def read_csv(path: Path, required: Sequence[str] = ()) -> list[dict[str, str]]:
    """Rows of a CSV (``.csv`` or ``.csv.gz``) as dicts; a missing required column stops."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8-sig")
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read the CSV ({exc}); re-download or re-extract it.") from exc
    reader = csv.reader(io.StringIO(text))
    columns = next(reader, [])
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(f"{path}: missing required column(s) {', '.join(missing)} (found: "
                        f"{', '.join(columns) or 'no header'}). Use the file as distributed, or name your "
                        "columns with the importer's --*-col flags.")
    with gc_paused():
        return [dict(zip(columns, row)) for row in reader if row]


def parse_label(value: str | None) -> int | None:
    """A label cell -> code: 1/1.0/positive, 0/0.0/negative, -1/-1.0/uncertain, blank/missing.

    None for anything else (the caller quarantines the record, naming the column).
    """
    return _LABEL_WORDS.get((value or "").strip().lower())


def parse_labels(row: dict[str, str], columns: dict[str, str]) -> tuple[dict[str, int], tuple[str, str] | None]:
    """``columns``: CSV column -> class name. Returns (labels, problem or None)."""
    labels = {}
    words = _LABEL_WORDS
    for column, cls in columns.items():
        value = row.get(column) or ""
        code = words.get(value)  # exact cells ("1.0", "") first: this runs for every cell of big CSVs
        if code is None:
            code = parse_label(value)
            if code is None:
                detail = f"column {column!r} has value {value!r}; allowed: 1, 0, -1, blank (or positive/negative/uncertain)"
                return labels, ("bad_label", detail)
        labels[cls] = code
    return labels, None


# -- subjects and splits -------------------------------------------------------------------------
def resolve_subject_key(key: str | None) -> bytes | None:
    """The HMAC key: the argument, else ``$MEDVLP_SUBJECT_KEY``, else None."""
    key = key if key else os.environ.get(KEY_ENV)
    return key.encode() if key else None


def require_subject_key(key: bytes | None, where: str) -> bytes:
    if not key:
        raise ConfigError(f"{where}: the subject id must come from the DICOM PatientID, which is never stored "
                          f"raw. Fix: give a secret key with --subject-key KEY or the environment variable "
                          f"{KEY_ENV} (keep it private and reuse it, so that later exports of the same patients "
                          "map to the same subjects), or add a subject column to your CSV.")
    return key


def keyed_hash(key: bytes, value: str, length: int = 16) -> str:
    """HMAC-SHA256 of ``value``, truncated to ``length`` hex digits (a stable pseudonym)."""
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:length]


def split_by_subject(subject_id: str, fractions: Sequence[tuple[str, float]] = DEFAULT_SPLIT_FRACTIONS) -> str:
    """A deterministic split from the subject's SHA-256: every study of a subject lands together."""
    u = int(hashlib.sha256(subject_id.encode()).hexdigest()[:12], 16) / 16**12
    total = sum(f for _, f in fractions)
    acc = 0.0
    for name, frac in fractions:
        acc += frac / total
        if u < acc:
            return name
    return fractions[-1][0]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
