"""Training from tar shards: a streaming, rank- and worker-split, source-mixing data stream.

Reads the shards written by :mod:`medvlp.data.shards` (``shards.json`` + ``*.tar``) member
by member, so memory does not grow with the number or size of shards. The semantics
(documented for users in ``docs/data/streaming.md``):

* **Assignment.** Each source (``data.sources``; the default is ``data.train_split`` as paired)
  is read in *source epochs*. In source epoch ``e`` its shards are put in a seeded order
  (seed, source, e) and their samples, in that order, form positions ``0 .. N-1``. Rank ``r``
  of ``world`` takes positions ``[r*M, (r+1)*M)`` with ``M = ceil(N / world)``; then the
  rank's range is cut into ``num_workers`` contiguous parts (sizes differ by at most one),
  one per DataLoader worker. So every sample of the epoch goes to exactly one (rank, worker).
* **Padding.** Positions ``N .. world*M-1`` (at most ``world-1`` of them) wrap to positions
  ``0, 1, ...``: the first samples of the first shard(s) of the epoch's shard order repeat,
  read once by rank 0 and once more by the last rank(s). Every rank therefore takes the same
  number of samples per source epoch, hence the same number of steps.
* **Shuffle buffer.** Each worker streams its part through a buffer of ``shuffle_buffer``
  samples (seeded by seed, source, epoch, rank, worker) and drains it at the end of its part,
  so a worker finishes source epoch ``e`` before it starts ``e + 1``.
* **Weights.** Every batch holds exactly ``batch_counts(weights, batch_size)`` samples of each
  source (as :mod:`medvlp.data.mixed`). The stream is endless; a source whose part runs out
  starts its next epoch, so small sources repeat more often than large ones.
* **Resume.** The state is the number of batches consumed (``position``); a new stream with
  the same seed, world size and ``num_workers`` continues exactly where the old one stopped.

Samples are decoded and augmented as the PNG-folder pipeline does (same transforms, seeded
by (seed, source epoch, sample key)) and collated by the unchanged
:class:`~medvlp.data.loader.Collator`. A corrupt member (unreadable image or metadata, a
truncated tar) is skipped and reported in ``Batch.skipped`` with its shard and key.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from medvlp.config import SourceConfig
from medvlp.data.loader import Collator
from medvlp.data.mixed import Source, batch_counts
from medvlp.data.sample import Batch, Sample
from medvlp.data.shards import INDEX_NAME
from medvlp.data.transforms import Preprocess, augment, load_image, normalize, to_tensor
from medvlp.errors import ConfigError, DataError

_PLACEHOLDER = Sample(id="", subject_id="", study_id="", split="")


def _seed(*parts: int) -> int:
    value = 0
    for p in parts:
        value = (value * 1_000_003 + int(p)) % (2**63 - 1)
    return value


def resolve_shards(path: str | os.PathLike) -> Path:
    """The folder holding ``shards.json``: ``path`` itself or ``path/shards``."""
    path = Path(path)
    for folder in (path, path / "shards"):
        if (folder / INDEX_NAME).is_file():
            return folder
    raise ConfigError(f"data.shards: no {INDEX_NAME} in {path} nor in {path / 'shards'}; point it at the folder "
                      "written by `medvlp synth --shards` (or `medvlp prepare`)")


def read_shard_index(path: str | os.PathLike) -> tuple[Path, list[dict]]:
    folder = resolve_shards(path)
    index = json.loads((folder / INDEX_NAME).read_text())
    missing = [e["file"] for e in index if not (folder / e["file"]).is_file()]
    if missing:
        raise DataError(f"{folder / INDEX_NAME}: {len(missing)} listed shard(s) missing, e.g. {missing[0]}; "
                        "copy the whole shard folder or write the shards again")
    return folder, index


def iter_members(path: str | os.PathLike, start: int = 0, stop: int | None = None,
                 exts: tuple[str, ...] | None = None) -> Iterator[tuple[str, dict[str, bytes] | str]]:
    """Samples ``start .. stop-1`` of one shard as ``(key, {ext: bytes})``.

    Members of skipped samples (and extensions not in ``exts``) are never read: tarfile seeks
    over their data. A tar error ends the shard with ``(key, message)`` naming the last key read.
    """
    stop = float("inf") if stop is None else stop
    name = Path(path).name
    index, key, current = -1, None, {}
    try:
        with tarfile.open(path, "r:") as tar:
            while True:
                member = tar.next()
                tar.members = []  # tarfile keeps every header read; drop them so memory stays flat
                if member is None:
                    break
                if not member.isfile():
                    continue
                k, _, ext = member.name.partition(".")
                if k != key:
                    if key is not None and start <= index:
                        yield key, current
                    index, key, current = index + 1, k, {}
                    if index >= stop:
                        return
                if index >= start and (exts is None or ext in exts):
                    data = tar.extractfile(member)
                    current[ext] = data.read() if data else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        yield str(key), f"shard {name}: unreadable after key {key!r} ({exc})"
        return
    if key is not None and start <= index < stop:
        yield key, current


def _sample_from_json(data: bytes) -> Sample:
    row = json.loads(data)
    return Sample(id=str(row["id"]), subject_id=str(row["subject_id"]), study_id=str(row["study_id"]),
                  split=row["split"], image=None, view=row.get("view", ""), findings=row.get("findings") or "",
                  impression=row.get("impression") or "", labels=dict(row.get("labels") or {}),
                  meta=dict(row.get("meta") or {}))


def read_shard_samples(paths: Sequence[str | os.PathLike]) -> list[Sample]:
    """The metadata (``.json`` members) of every sample in ``paths``; images are not read."""
    samples = []
    for path in paths:
        for key, rec in iter_members(path, exts=("json",)):
            if isinstance(rec, str) or "json" not in rec:
                continue  # reported (and skipped) again when the stream reaches it
            try:
                samples.append(_sample_from_json(rec["json"]))
            except (ValueError, KeyError):
                continue
    return samples


@dataclass
class ShardSource(Source):
    """A :class:`~medvlp.data.mixed.Source` read from shards: ``shards`` holds (path, rows)."""

    shards: list[tuple[str, int]] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(n for _, n in self.shards)


def read_shard_sources(cfg, *, with_samples: bool = True) -> list[ShardSource]:
    """The configured sources over the shards of ``data.shards`` (split = shard split).

    ``with_samples`` also reads every sample's metadata (not its image): the train loop
    trains the tokenizer on the reports and records the pre-training subjects.
    """
    folder, index = read_shard_index(cfg.data.shards)
    specs = cfg.data.sources or [SourceConfig(split=cfg.data.train_split, kind="paired", weight=1.0)]
    sources = []
    for spec in specs:
        if spec.kind == "report":
            raise ConfigError(f"data.sources: kind 'report' ({spec.split!r}) is not supported with data.shards (the "
                              "shard stream reads images); train from the PNG folder (data.manifest, no data.shards)")
        if tuple(spec.subjects) != (0.0, 1.0):
            raise ConfigError(f"data.sources: subjects ranges ({spec.split!r}: {list(spec.subjects)}) are not "
                              "supported with data.shards; write the subject subset into its own split instead")
        shards = [(str(folder / e["file"]), int(e["rows"])) for e in index if e["split"] == spec.split]
        if not shards:
            splits = sorted({e["split"] for e in index})
            raise DataError(f"data.shards: no shard of split {spec.split!r} in {folder / INDEX_NAME}; "
                            f"splits there: {', '.join(splits)}")
        samples = read_shard_samples([p for p, _ in shards]) if with_samples else []
        sources.append(ShardSource(spec.split, spec.kind, float(spec.weight), samples, shards))
    return sources


def epoch_segments(rows: Sequence[int], *, seed: int, source: int, epoch: int, rank: int, world: int,
                   worker: int, num_workers: int) -> list[tuple[int, int, int]]:
    """What one (rank, worker) reads of one source epoch: ``(shard index, first row, stop row)``
    in reading order (module docstring: assignment and padding)."""
    counts_all = np.asarray(rows, dtype=np.int64)
    order = torch.randperm(len(counts_all), generator=torch.Generator().manual_seed(_seed(seed, source, epoch))).numpy()
    counts = counts_all[order]
    ends = np.cumsum(counts)
    starts = ends - counts
    total = int(ends[-1]) if len(ends) else 0
    if total < world * num_workers:
        raise DataError(f"a source has {total} samples, fewer than its {world} ranks x {num_workers} workers; "
                        "lower data.num_workers or add data")
    per_rank = -(-total // world)
    lo = rank * per_rank + worker * per_rank // num_workers
    hi = rank * per_rank + (worker + 1) * per_rank // num_workers
    parts = [(lo, min(hi, total))] if lo < total else []
    if hi > total:  # padding: wrap to the start of the epoch's order
        parts.append((max(lo, total) - total, hi - total))
    segments = []
    for a, b in parts:
        for i in np.nonzero((starts < b) & (ends > a))[0]:
            segments.append((int(order[i]), int(max(a - starts[i], 0)), int(min(b, ends[i]) - starts[i])))
    return segments


def part_size(total: int, *, rank: int, world: int, worker: int, num_workers: int) -> int:
    """Samples one (rank, worker) reads per source epoch (the same every epoch)."""
    per_rank = -(-total // world)
    return (worker + 1) * per_rank // num_workers - worker * per_rank // num_workers


def shuffle_buffer(items: Iterator, size: int, gen: torch.Generator) -> Iterator:
    """Yield ``items`` mixed through a buffer of ``size``: each output is a random element of the buffer."""
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(torch.randint(len(buf), (1,), generator=gen))
        buf[j], item = item, buf[j]
        yield item
    order = torch.randperm(len(buf), generator=gen).tolist()
    yield from (buf[j] for j in order)


class ShardDataset(IterableDataset):
    """Endless per-rank stream of *batches* (lists of ``(sample, kind, image or None, error or None)``).

    Use it with ``DataLoader(batch_size=None, collate_fn=StreamCollator(...))``; a worker's
    role is ``(worker id + position) % num_workers`` so that batch ``b`` always comes from
    role ``b % num_workers`` and a resumed stream reproduces the original order.
    """

    def __init__(self, sources: Sequence[ShardSource], pre: Preprocess, *, batch_size: int, seed: int,
                 augment: bool = True, rank: int = 0, world: int = 1, shuffle_buffer: int = 1000, position: int = 0):
        if shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer: must be >= 1 (1 = no shuffling), got {shuffle_buffer}")
        self.sources = list(sources)
        self.counts = batch_counts([s.weight for s in self.sources], batch_size)
        self.pre, self.seed, self.augment = pre, seed, augment
        self.rank, self.world, self.buffer, self.position = rank, world, shuffle_buffer, position

    def source_records(self, s: int, role: int, num_workers: int, start_epoch: int = 0) -> Iterator[tuple]:
        """Raw records ``(shard name, key, members or error, source epoch)`` of source ``s`` for one role."""
        src = self.sources[s]
        rows = [n for _, n in src.shards]
        epoch = start_epoch
        while True:
            segments = epoch_segments(rows, seed=self.seed, source=s, epoch=epoch, rank=self.rank, world=self.world,
                                      worker=role, num_workers=num_workers)

            def read(segments=segments, epoch=epoch):
                for shard, a, b in segments:
                    path = src.shards[shard][0]
                    for n, (key, rec) in enumerate(iter_members(path, a, b, exts=("png", "json"))):
                        if isinstance(rec, str):  # truncated tar: one skip per sample not read
                            yield from ((Path(path).name, f"{key}+{i}", rec, epoch) for i in range(b - a - n))
                            break
                        yield Path(path).name, key, rec, epoch

            gen = torch.Generator().manual_seed(_seed(self.seed, s, epoch, self.rank, role, 17))
            yield from shuffle_buffer(read(), self.buffer, gen)
            epoch += 1

    def decode(self, s: int, record: tuple) -> tuple[Sample | None, str, torch.Tensor | None, str | None]:
        shard, key, members, epoch = record
        kind = self.sources[s].kind
        if isinstance(members, str):
            return None, kind, None, members
        try:
            sample = _sample_from_json(members["json"])
        except (KeyError, ValueError) as exc:
            return None, kind, None, f"shard {shard}, key {key}: metadata missing or unreadable ({exc!r})"
        if "png" not in members:
            return sample, kind, None, f"shard {shard}, key {key}: no image member"
        try:
            x = to_tensor(load_image(io.BytesIO(members["png"])), self.pre)
        except DataError as exc:
            reason = str(exc).split(": ", 1)[-1]
            return sample, kind, None, f"shard {shard}, key {key} ({sample.id}): cannot read image ({reason})"
        if self.augment:
            x = augment(x, torch.Generator().manual_seed(_seed(self.seed, s, epoch, zlib.crc32(key.encode()))))
        return sample, kind, normalize(x, self.pre), None

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        role = (worker + self.position) % num_workers
        done = len(range(role, self.position, num_workers))  # batches of this role already consumed
        streams = []
        for s, (src, c) in enumerate(zip(self.sources, self.counts)):
            size = part_size(src.rows, rank=self.rank, world=self.world, worker=role, num_workers=num_workers)
            epoch, offset = divmod(done * c, size)
            it = self.source_records(s, role, num_workers, epoch)
            for _ in range(offset):  # resume inside an epoch: replay the buffer without decoding
                next(it)
            streams.append(it)
        while True:
            yield [self.decode(s, next(streams[s])) for s, c in enumerate(self.counts) for _ in range(c)]


class StreamCollator:
    """Adapts :class:`~medvlp.data.loader.Collator` to stream items that carry their own sample."""

    def __init__(self, tokenizer, classes: Sequence[str], *, max_length: int, sections: Sequence[str],
                 paired_labels: str = "manifest"):
        self.tokenizer, self.classes, self.max_length = tokenizer, list(classes), max_length
        self.sections, self.paired_labels = tuple(sections), paired_labels
        self._labeler = None

    def __call__(self, items: Sequence[tuple]) -> Batch:
        samples = [s if s is not None else _PLACEHOLDER for s, _, _, _ in items]
        kinds = [k for _, k, _, _ in items]
        if self.paired_labels == "labeler":
            import dataclasses

            from medvlp.data.labeler import ReportLabeler

            self._labeler = self._labeler or ReportLabeler()
            todo = [i for i, k in enumerate(kinds) if k == "paired" and items[i][0] is not None]
            labels = self._labeler.label_many(samples[i].text(self.sections) for i in todo)
            for i, lab in zip(todo, labels):
                samples[i] = dataclasses.replace(samples[i], labels=lab)
        collate = Collator(samples, self.tokenizer, self.classes, max_length=self.max_length, sections=self.sections,
                           kinds=kinds, paired_labels=self.paired_labels)
        return collate([(i, x, err) for i, (_, _, x, err) in enumerate(items)])


class ShardStream:
    """Drop-in for :class:`~medvlp.data.mixed.MixedStream` reading shards (same arguments, plus
    ``shuffle_buffer``); ``position`` is the number of batches consumed (what checkpoints store)."""

    def __init__(self, sources: Sequence[ShardSource], pre, tokenizer, classes: Sequence[str], *, batch_size: int,
                 max_length: int, sections: Sequence[str], seed: int, augment: bool = True,
                 paired_labels: str = "manifest", num_workers: int = 0, rank: int = 0, world: int = 1,
                 position: int = 0, shuffle_buffer: int = 1000):
        self.sources = list(sources)
        self.position, self.num_workers, self.world = position, num_workers, world
        self.dataset = ShardDataset(self.sources, pre, batch_size=batch_size, seed=seed, augment=augment, rank=rank,
                                    world=world, shuffle_buffer=shuffle_buffer, position=position)
        self.counts = self.dataset.counts
        for src in self.sources:
            if src.rows < world * max(num_workers, 1):
                raise DataError(f"source {src.split!r} ({src.kind}) has {src.rows} samples in its shards, fewer than "
                                f"{world} ranks x {max(num_workers, 1)} workers; lower data.num_workers or add data")
        self.collate = StreamCollator(tokenizer, classes, max_length=max_length, sections=sections,
                                      paired_labels=paired_labels)

    def epochs(self) -> dict[str, float]:
        """How many passes over each source the consumed batches amount to."""
        return {f"{src.split}/{src.kind}": self.position * c * self.world / src.rows
                for src, c in zip(self.sources, self.counts)}

    def __iter__(self) -> Iterator[Batch]:
        self.dataset.position = self.position
        loader = DataLoader(self.dataset, batch_size=None, collate_fn=self.collate, num_workers=self.num_workers,
                            persistent_workers=False)
        for batch in loader:
            self.position += 1
            yield batch
