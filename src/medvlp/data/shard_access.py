"""Random access to the pixels of shard-backed samples, so every reader takes files and shards alike.

``medvlp prepare`` writes a manifest whose rows have ``image: null``: the pixels live in a tar
shard (``meta["shard"]``, a file name under the dataset's ``shards/`` folder) as member
``<meta["key"]>.png``, and a mask, when there is one, as member ``meta["mask"]``
(``<key>.mask.png``). :func:`medvlp.data.manifest.read_manifest` resolves the shard to an
absolute path in ``meta["shard_path"]`` (never written back). Readers call this module instead
of opening ``sample.image`` themselves:

* :func:`image_ref` - a hashable handle (a file path, or a :class:`ShardMember`) for caches;
* :func:`load_ref` / :func:`load_sample_image` - the decoded image, float32 (H, W) in [0, 1];
* :func:`open_image` / :func:`mask_source` - something ``PIL.Image.open`` accepts;
* :func:`check_readable` - the up-front check that every image (file or member) exists.

A member is read by seeking to it: the first access to a shard lists its members once with
``tarfile`` into ``{name: (offset, size)}`` (a few bytes per member; at most ``MAX_SHARDS`` shards
are kept, least recently used dropped first), and each read opens the file, seeks and reads
``size`` bytes. Nothing is shared between processes but the index dict (copied on fork and
valid there, since offsets do not depend on the process), so DataLoader workers are safe;
a lock makes index building thread safe.
"""
from __future__ import annotations

import io
import os
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medvlp.data.sample import Sample
from medvlp.errors import DataError

MAX_SHARDS = 4096  # indexed shards kept per process: ~100 B per member, so bounded memory
SHARD_DIR = "shards"
_FIX = ("point data.manifest at the whole prepared folder (manifest.jsonl next to shards/), "
        "or re-run `medvlp prepare` to rebuild the shards")


@dataclass(frozen=True)
class ShardMember:
    """One member of one tar shard (absolute shard path, member name)."""

    shard: str
    name: str

    def __str__(self) -> str:
        return f"{self.shard}#{self.name}"


ImageRef = str | ShardMember


def resolve_shard(root: str | os.PathLike, shard: str) -> str:
    """Absolute path of shard ``shard`` of the dataset in folder ``root``: ``root/shards/<shard>``
    (the layout of ``medvlp prepare`` and ``medvlp synth --shards``), else ``root/<shard>``."""
    root = Path(root)
    if os.path.isabs(shard):
        return shard
    for cand in (root / SHARD_DIR / shard, root / shard):
        if cand.is_file():
            return str(cand)
    return str(root / SHARD_DIR / shard)  # missing: the error at read time names this path


def _shard_of(sample: Sample) -> str | None:
    return sample.meta.get("shard_path") or sample.meta.get("shard")


def image_ref(sample: Sample) -> ImageRef | None:
    """The image of ``sample``: its file path, or the shard member holding it; None if neither is given."""
    if sample.image:
        return sample.image
    shard, key = _shard_of(sample), sample.meta.get("key")
    if shard and key:
        return ShardMember(str(shard), f"{key}.png")
    return None


def mask_ref(sample: Sample, root: str | os.PathLike) -> ImageRef | None:
    """The mask of ``sample`` (``meta["mask"]``): a member of its shard, else a file relative to ``root``."""
    mask = sample.meta.get("mask")
    if not mask:
        return None
    shard = _shard_of(sample)
    if shard and not sample.image:
        return ShardMember(str(shard), str(mask))
    return str(Path(root) / mask)


class _Index:
    """Per-process LRU of shard member tables ``{shard: {name: (offset, size)}}``."""

    def __init__(self, max_shards: int = MAX_SHARDS):
        self.max_shards = max_shards
        self.tables: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
        self.lock = threading.Lock()

    def table(self, shard: str) -> dict[str, tuple[int, int]]:
        with self.lock:
            table = self.tables.get(shard)
            if table is not None:
                self.tables.move_to_end(shard)
                return table
        table = _list_members(shard)  # outside the lock: a slow disk does not block other shards
        with self.lock:
            self.tables[shard] = table
            while len(self.tables) > self.max_shards:
                self.tables.popitem(last=False)
        return table

    def clear(self) -> None:
        with self.lock:
            self.tables.clear()


def _list_members(shard: str) -> dict[str, tuple[int, int]]:
    if not os.path.isfile(shard):
        raise DataError(f"shard not found: {shard}. Fix: {_FIX}")
    try:
        with tarfile.open(shard, "r:") as tar:  # uncompressed only: members must be seekable
            return {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"cannot list shard {shard} ({exc}); it is truncated or not a tar. Fix: {_FIX}") from None


INDEX = _Index()


def read_member(ref: ShardMember) -> bytes:
    """The bytes of one shard member (index built on first use of the shard, then one seek + read)."""
    table = INDEX.table(ref.shard)
    where = table.get(ref.name)
    if where is None:
        raise DataError(f"shard {ref.shard} has no member {ref.name!r} (sample key {ref.name.split('.')[0]!r}); "
                        f"the manifest and the shards disagree. Fix: {_FIX}")
    offset, size = where
    try:
        with open(ref.shard, "rb") as fh:
            fh.seek(offset)
            data = fh.read(size)
    except OSError as exc:
        raise DataError(f"cannot read {ref} ({exc}). Fix: {_FIX}") from None
    if len(data) != size:
        raise DataError(f"{ref}: member truncated ({len(data)} of {size} bytes); the shard was cut short. Fix: {_FIX}")
    return data


def open_image(ref: ImageRef | None) -> str | io.BytesIO:
    """What ``PIL.Image.open`` takes for ``ref``: the path itself, or the member's bytes in memory."""
    if ref is None:
        raise DataError("a sample has neither an image path nor meta.shard + meta.key; check its manifest row")
    if isinstance(ref, ShardMember):
        return io.BytesIO(read_member(ref))
    return ref


def load_ref(ref: ImageRef | None) -> np.ndarray:
    """Decode an image file or shard member as float32 (H, W) in [0, 1] (see ``transforms.load_image``)."""
    from medvlp.data.transforms import load_image

    if not isinstance(ref, ShardMember):
        return load_image(open_image(ref))
    data = open_image(ref)  # a missing shard or member raises its own message
    try:
        return load_image(data)
    except DataError as exc:
        # load_image names a BytesIO object: name the shard and member instead
        raise DataError(f"cannot read image {ref}: {str(exc).split(': ', 1)[-1]}") from None


def load_sample_image(sample: Sample) -> np.ndarray:
    return load_ref(image_ref(sample))


def mask_source(sample: Sample, root: str | os.PathLike) -> str | io.BytesIO:
    """``meta["mask"]`` of ``sample`` as something ``PIL.Image.open`` takes (file path or member bytes)."""
    ref = mask_ref(sample, root)
    if ref is None:
        raise DataError(f"sample {sample.id} has no meta.mask")
    return open_image(ref)


def exists(ref: ImageRef | None) -> bool:
    """Whether the file or shard member is there (a missing or unreadable shard counts as absent)."""
    if ref is None:
        return False
    if not isinstance(ref, ShardMember):
        return os.path.isfile(ref)
    try:
        return ref.name in INDEX.table(ref.shard)
    except DataError:
        return False


def check_readable(samples: Sequence[Sample], limit: int = 5) -> None:
    """Stop with one :class:`DataError` listing missing images (files or shard members): a missing
    image nearly always means a wrong dataset root, so it is an error up front, not a skip."""
    missing = [(s, ref) for s in samples for ref in [image_ref(s)] if not exists(ref)]
    if not missing:
        return
    shown = ", ".join(f"{s.id} -> {ref}" for s, ref in missing[:limit])
    raise DataError(
        f"{len(missing)} of {len(samples)} images are missing, e.g. {shown}. Check data.manifest points at the "
        "folder that holds the images (paths are relative to the manifest; prepared datasets need their "
        f"shards/ folder next to manifest.jsonl). Fix: {_FIX}"
    )
