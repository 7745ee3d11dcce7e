"""SIIM-ACR Pneumothorax Segmentation (Kaggle, 2019): DICOMs with run-length-encoded masks.

Layout (the Kaggle download, extracted)::

    siim-acr/                                    (--root)
      train-rle.csv                              ImageId, EncodedPixels   (note the space)
      dicom-images-train/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm      1024 x 1024

``EncodedPixels`` is ``-1`` for an image without pneumothorax, else SIIM's *relative* run-length
code: pairs ``start length`` where each start counts pixels from the end of the previous run
(the first from pixel 0), over the image flattened **column-major** (down the first column,
then the next: flat index ``p`` is row ``p % height``, column ``p // height``), as in the
challenge's ``mask_functions.py``. An image with several pneumothoraces has several rows; the
mask is their union. The mask is stored in the SynthCXR class-bit convention (bit of
"Pneumothorax" set; docs/synthcxr.md "masks"), resized with the image and written as the shard
member ``<key>.mask.png`` (``meta["mask"]``); images without pneumothorax get an empty mask, so
segmentation sees negatives. ``labels`` = {Pneumothorax: 1 or 0}; ``meta.instances`` = number
of RLE rows. The CSV has no patient id: the subject is the keyed hash of the DICOM PatientID
(``--subject-key`` / ``MEDVLP_SUBJECT_KEY`` required), the study that of StudyInstanceUID;
split by subject hash.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from medvlp.data.prepare import PREPARERS
from medvlp.data.prepare.base import (
    NEGATIVE,
    POSITIVE,
    Preparer,
    RawRecord,
    find_dir,
    find_file,
    read_csv,
)
from medvlp.errors import DataError

CLASS = "Pneumothorax"
LABEL_FILES = ("train-rle.csv", "stage_2_train.csv")
IMAGE_DIRS = ("dicom-images-train", "stage_2_images")


def decode_siim_rle(rle: str, height: int, width: int) -> np.ndarray:
    """SIIM relative, column-major RLE -> (height, width) bool mask ("-1" or "" -> empty).

    Raises ValueError for an odd number of values, a negative value, or a run past the image.
    """
    text = (rle or "").strip()
    if text in ("", "-1"):
        return np.zeros((height, width), dtype=bool)
    values = np.array(text.split(), dtype=np.int64)
    if values.size % 2 or (values < 0).any():
        raise ValueError(f"malformed RLE ({values.size} values; starts and lengths must pair up and be >= 0)")
    rel, lengths = values[0::2], values[1::2]
    starts = np.cumsum(rel) + np.cumsum(lengths) - lengths  # each start counts from the previous run's end
    ends = starts + lengths
    total = height * width
    if ends.size and ends[-1] > total:
        raise ValueError(f"RLE runs end at pixel {int(ends[-1])}, past the {height}x{width} image")
    edges = np.zeros(total + 1, dtype=np.int32)
    np.add.at(edges, starts, 1)
    np.add.at(edges, ends, -1)
    flat = np.cumsum(edges[:-1]) > 0
    return flat.reshape(width, height).T  # column-major: the flat order runs down the columns


def encode_siim_rle(mask: np.ndarray) -> str:
    """Inverse of :func:`decode_siim_rle` (for tests and users writing predictions)."""
    flat = np.asarray(mask, dtype=bool).T.ravel()
    if not flat.any():
        return "-1"
    d = np.diff(np.concatenate([[0], flat.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    rel = starts - np.concatenate([[0], ends[:-1]])
    return " ".join(str(int(v)) for pair in zip(rel, ends - starts) for v in pair)


@dataclass(frozen=True)
class RleMask:
    """The record's mask, rendered in the worker at the DICOM's size: the union of its RLE rows."""

    rles: tuple[str, ...]
    bit: int

    def __call__(self, height: int, width: int) -> np.ndarray:
        union = np.zeros((height, width), dtype=bool)
        for rle in self.rles:
            union |= decode_siim_rle(rle, height, width)
        return union.astype(np.uint16) << self.bit


def parse_siim_rle_csv(path) -> dict[str, list[str]]:
    """{ImageId: [EncodedPixels, ...]} in file order (header names compared without spaces)."""
    rows = read_csv(path)
    if rows:
        names = {k.strip(): k for k in rows[0]}
        missing = [c for c in ("ImageId", "EncodedPixels") if c not in names]
        if missing:
            raise DataError(f"{path}: missing required column(s) {', '.join(missing)} (found: {', '.join(names)})")
        image_col, rle_col = names["ImageId"], names["EncodedPixels"]
    out: dict[str, list[str]] = {}
    for row in rows:
        out.setdefault(row[image_col].strip(), []).append((row[rle_col] or "").strip())
    return out


@PREPARERS.register("siim-acr", description="SIIM-ACR Pneumothorax (Kaggle): DICOMs + RLE masks (<key>.mask.png)")
class SiimAcrPreparer(Preparer):
    name = "siim-acr"
    description = "SIIM-ACR pneumothorax masks from RLE, class-bit mask members"

    def __init__(self, root):
        super().__init__(root)
        self.labels_csv = find_file(self.root, LABEL_FILES, "SIIM-ACR train-rle.csv",
                                    "Point --root at the extracted Kaggle folder (docs/data/siim-acr.md).")
        self.images = find_dir(self.root, IMAGE_DIRS, "DICOMs")
        self.stats: Counter = Counter()

    def records(self):
        from medvlp.data.synth.findings import CLASSES

        bit = CLASSES.index(CLASS)
        masks = parse_siim_rle_csv(self.labels_csv)
        files = {p.stem: p.relative_to(self.root).as_posix() for p in (self.root / self.images).rglob("*.dcm")}
        self.stats["dicoms_without_label_row"] = len(set(files) - set(masks))
        for uid in sorted(masks):
            rles = tuple(r for r in masks[uid] if r not in ("", "-1"))
            self.stats["positive" if rles else "negative"] += 1
            yield RawRecord(id=uid, image=files.get(uid, f"{self.images}/{uid}.dcm"), subject_id=None, study_id=None,
                            labels={CLASS: POSITIVE if rles else NEGATIVE}, mask=RleMask(rles, bit),
                            meta={"instances": len(rles)})
