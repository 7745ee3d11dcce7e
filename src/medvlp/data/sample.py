"""The one schema every data source maps to: :class:`Sample` (one record) and
:class:`Batch` (collated tensors).

Labels are CheXpert-style codes, encoded explicitly so no loss confuses "not
mentioned" with "negative":

====================  =====
POSITIVE              1
NEGATIVE              0
UNCERTAIN             -1
MISSING               -2
====================  =====

``subject_id`` and ``study_id`` are the dataset's own de-identified ids (or a keyed
hash); never a name or a raw patient id. Splits are by subject.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import torch

POSITIVE, NEGATIVE, UNCERTAIN, MISSING = 1, 0, -1, -2
LABEL_NAMES = {POSITIVE: "positive", NEGATIVE: "negative", UNCERTAIN: "uncertain", MISSING: "missing"}


def hash_subject(subject_id: str) -> str:
    """SHA-256 of a subject id: what checkpoints store to let evaluation check for
    subject overlap without shipping the ids themselves."""
    return hashlib.sha256(str(subject_id).encode()).hexdigest()


@dataclass
class Sample:
    """One image (and, when paired, its report) as read from a manifest row."""

    id: str
    subject_id: str
    study_id: str
    split: str
    image: Optional[str] = None  # absolute path once resolved by the manifest reader
    view: str = ""
    findings: str = ""
    impression: str = ""
    labels: dict[str, int] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def has_text(self) -> bool:
        return bool(self.findings.strip() or self.impression.strip())

    def text(self, sections: tuple[str, ...] | list[str] = ("findings", "impression")) -> str:
        """The report as one string: the requested sections, in order, non-empty ones only."""
        parts = []
        for sec in sections:
            value = getattr(self, sec).strip()
            if value:
                parts.append(f"{sec.upper()}: {value}")
        return " ".join(parts)

    def label_vector(self, classes: list[str]) -> list[int]:
        return [int(self.labels.get(c, MISSING)) for c in classes]


@dataclass
class Batch:
    """Collated tensors. ``labels`` is (B, K) with the codes above; flags are (B,) bools.

    ``word_ids`` (B, L) gives each token's word index (-1 for special and padding
    tokens) so whole-word masking can be done without re-tokenising.
    """

    images: torch.Tensor
    input_ids: Optional[torch.Tensor] = None
    attention_mask: Optional[torch.Tensor] = None
    word_ids: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    has_text: Optional[torch.Tensor] = None
    has_labels: Optional[torch.Tensor] = None
    paired: Optional[torch.Tensor] = None
    has_image: Optional[torch.Tensor] = None  # None = every row has an image; False rows hold zeros (kind "report")
    ids: list[str] = field(default_factory=list)
    subject_ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # unreadable samples left out of this batch

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str) -> "Batch":
        kwargs = {}
        for f in fields(self):
            value = getattr(self, f.name)
            kwargs[f.name] = value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        return Batch(**kwargs)
