"""The mixed-source training stream: paired, unpaired-image and image-label samples in one.

A stream is made of *sources* (``data.sources``): a split of the manifest used as

- ``paired``   image + report (+ the manifest's labels, or with ``data.paired_labels: labeler``
  the report labeler's, read once per sample here; none with ``data.paired_labels: none``),
- ``unpaired`` image only (report and labels withheld, as for images without reports),
- ``labeled``  image + labels (report withheld, as for a labelled classification set),
- ``report``   report + labels, no image (a labelled report corpus; the image is never read and
  the batch row holds zeros with ``has_image`` False; only methods with ``takes_report_only_rows``
  accept such a source: MedCLIP).

Every global batch takes a fixed number of samples from each source, proportional to the
source weights (largest-remainder rounding, at least one each), so the mix is exact at every
step rather than only on average (MaskedCLIP's paired:unpaired ratio, for instance).

Order is a pure function of (seed, source, epoch of that source, position): source ``s``
is read as an endless concatenation of seeded permutations of its samples, and global batch
``b`` takes positions ``[b * n_s * world, (b + 1) * n_s * world)`` of it, split across ranks.
So each sample of a source's epoch goes to exactly one rank, sources cycle independently
(a small labelled set repeats more often than a large paired one), and the whole state of the
stream is one integer: the number of global batches consumed. Resume is exact.

The flags of :class:`~medvlp.data.sample.Batch` (``has_text``, ``paired``, ``has_labels``)
tell each loss which samples it may use.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from medvlp.config import SourceConfig
from medvlp.data.loader import Collator, ImageTextDataset, check_images_exist
from medvlp.data.manifest import read_manifest
from medvlp.data.sample import Batch, Sample, hash_subject
from medvlp.errors import ConfigError, DataError

KINDS = ("paired", "unpaired", "labeled", "report")


@dataclass
class Source:
    split: str
    kind: str
    weight: float
    samples: list[Sample]


def read_sources(cfg) -> list[Source]:
    """The configured sources with their samples (``data.train_split`` as paired if none)."""
    specs = cfg.data.sources or [SourceConfig(split=cfg.data.train_split, kind="paired", weight=1.0)]
    seen: dict[tuple[str, str], list[tuple[float, float]]] = {}
    sources = []
    for spec in specs:
        lo, hi = spec.subjects
        taken = seen.setdefault((spec.split, spec.kind), [])
        if any(lo < b and a < hi for a, b in taken):
            raise ConfigError(f"data.sources: split {spec.split!r} is listed twice as {spec.kind!r} with overlapping "
                              "subjects ranges; merge the entries")
        taken.append((lo, hi))
        samples = read_manifest(cfg.data.manifest, [spec.split])
        if (lo, hi) != (0.0, 1.0):
            samples = [s for s in samples if lo <= subject_position(s.subject_id) < hi]
            if not samples:
                raise DataError(f"data.sources: split {spec.split!r} has no subjects in subjects: [{lo}, {hi}]; "
                                "widen the range")
        if spec.kind in ("paired", "report"):
            dropped = sum(not s.has_text for s in samples)
            samples = [s for s in samples if s.has_text]
            if not samples:
                raise DataError(f"data.sources: split {spec.split!r} has no reports ({dropped} samples without); "
                                "use it as kind 'unpaired' or 'labeled', or choose a split with reports")
            if cfg.data.paired_labels == "labeler":
                samples = label_reports(samples, cfg.data.sections)
        if spec.kind != "report":  # a report source's images are never read
            check_images_exist(samples)
        sources.append(Source(spec.split, spec.kind, float(spec.weight), samples))
    return sources


def label_reports(samples: Sequence[Sample], sections: Sequence[str]) -> list[Sample]:
    """Copies of ``samples`` whose labels come from the rule-based report labeler
    (:class:`~medvlp.data.labeler.ReportLabeler`) run once on each report's text
    (``data.paired_labels: labeler``), replacing the manifest's labels."""
    import dataclasses

    from medvlp.data.labeler import ReportLabeler

    labeler = ReportLabeler()
    labels = labeler.label_many(s.text(tuple(sections)) for s in samples)
    return [dataclasses.replace(s, labels=lab) for s, lab in zip(samples, labels)]


def subject_position(subject_id: str) -> float:
    """A subject's fixed place in [0, 1), from its hash: what ``subjects: [lo, hi]`` selects on."""
    return int(hash_subject(subject_id)[:13], 16) / 16**13


def batch_counts(weights: Sequence[float], batch_size: int) -> list[int]:
    """Per-source samples in a batch of ``batch_size``: proportional to ``weights``
    (largest remainder, ties to the earlier source), at least one per source."""
    if batch_size < len(weights):
        raise ConfigError(f"data.batch_size ({batch_size}) is smaller than the number of data.sources "
                          f"({len(weights)}); every source needs at least one sample per batch")
    total = float(sum(weights))
    exact = [w / total * batch_size for w in weights]
    counts = [max(1, int(e)) for e in exact]
    while sum(counts) > batch_size:  # the max(1, .) floors may overshoot: take from the largest
        counts[counts.index(max(counts))] -= 1
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - int(exact[i])), i))
    k = 0
    while sum(counts) < batch_size:
        counts[order[k % len(order)]] += 1
        k += 1
    return counts


class MixedStream:
    """Endless, resumable stream of training batches mixed from several sources.

    ``position`` is the number of global batches already consumed (what a checkpoint stores).
    """

    def __init__(self, sources: Sequence[Source], pre, tokenizer, classes: Sequence[str], *, batch_size: int,
                 max_length: int, sections: Sequence[str], seed: int, augment: bool = True,
                 paired_labels: str = "manifest", num_workers: int = 0, rank: int = 0, world: int = 1,
                 position: int = 0):
        self.sources = list(sources)
        self.counts = batch_counts([s.weight for s in self.sources], batch_size)
        self.seed, self.rank, self.world, self.num_workers = seed, rank, world, num_workers
        self.position = position
        for src, c in zip(self.sources, self.counts):
            if len(src.samples) < c * world:
                raise DataError(f"source {src.split!r} ({src.kind}) has {len(src.samples)} samples, fewer than its "
                                f"{c} x {world} ranks per batch; lower data.batch_size or its weight, or add data")
        samples: list[Sample] = []
        kinds: list[str] = []
        self.offsets: list[int] = []
        for src in self.sources:
            self.offsets.append(len(samples))
            samples += src.samples
            kinds += [src.kind] * len(src.samples)
        self.samples = samples
        self.dataset = ImageTextDataset(samples, pre, train=True, augment=augment, seed=seed, kinds=kinds)
        self.collate = Collator(samples, tokenizer, classes, max_length=max_length, sections=sections, kinds=kinds,
                                paired_labels=paired_labels)
        self._perms: dict[tuple[int, int], list[int]] = {}

    def _perm(self, source: int, epoch: int) -> list[int]:
        key = (source, epoch)
        if key not in self._perms:
            if len(self._perms) > 4 * len(self.sources):
                self._perms.clear()
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + source * 7_919 + epoch * 104_729) % (2**63 - 1))
            self._perms[key] = torch.randperm(len(self.sources[source].samples), generator=gen).tolist()
        return self._perms[key]

    def batch_keys(self, b: int, rank: int | None = None) -> list[tuple[int, int]]:
        """This rank's (sample index, source epoch) keys of global batch ``b``."""
        rank = self.rank if rank is None else rank
        keys: list[tuple[int, int]] = []
        for s, (src, c) in enumerate(zip(self.sources, self.counts)):
            n = len(src.samples)
            start = b * c * self.world + rank * c
            for p in range(start, start + c):
                epoch, j = divmod(p, n)
                keys.append((self.offsets[s] + self._perm(s, epoch)[j], epoch))
        return keys

    def epochs(self) -> dict[str, float]:
        """How many passes over each source the consumed batches amount to."""
        return {f"{src.split}/{src.kind}": self.position * c * self.world / len(src.samples)
                for src, c in zip(self.sources, self.counts)}

    def __iter__(self) -> Iterator[Batch]:
        while True:
            # One DataLoader per chunk of batches keeps worker start-up rare while the key
            # list stays a pure function of the position.
            start = self.position
            chunk = [self.batch_keys(b) for b in range(start, start + 256)]
            loader = DataLoader(self.dataset, batch_sampler=chunk, collate_fn=self.collate,
                                num_workers=self.num_workers, persistent_workers=False)
            for batch in loader:
                self.position += 1
                yield batch
