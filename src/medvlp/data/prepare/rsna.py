"""RSNA Pneumonia Detection Challenge (Kaggle, 2018): chest X-ray DICOMs with opacity boxes.

Layout (the Kaggle download, extracted)::

    rsna-pneumonia/                              (--root)
      stage_2_train_labels.csv                   patientId,x,y,width,height,Target
      stage_2_detailed_class_info.csv            patientId,class   (optional)
      stage_2_train_images/<patientId>.dcm       1024 x 1024, 8-bit MONOCHROME2

The label CSV has one row per box (several rows for an image with several opacities) and one
row with empty coordinates and ``Target`` 0 for an image without. Boxes are ``x, y`` (top-left
column, row) and ``width, height`` in the DICOM's pixels. Each image becomes one record whose
``meta["findings"]`` lists ``{"name": "Consolidation", "bbox": [x, y, x + width, y + height)}``
per box (RSNA's "Lung Opacity" is the project's Consolidation class: airspace opacity), the
SynthCXR convention that :mod:`medvlp.eval.detection` reads; the pipeline rescales the boxes
to the stored image (``bbox_orig`` keeps the original). ``labels`` = {Consolidation: 1 or 0};
an image without boxes has ``findings == []`` (a detection negative). ``patientId`` is the
dataset's de-identified id (one image per patient): it is the subject. No official labelled
test set: split by subject hash.
"""
from __future__ import annotations

from collections import Counter

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

BOX_CLASS = "Consolidation"
LABEL_FILES = ("stage_2_train_labels.csv", "stage_1_train_labels.csv")
IMAGE_DIRS = ("stage_2_train_images", "stage_1_train_images")
COLUMNS = ("patientId", "x", "y", "width", "height", "Target")


def parse_rsna_labels(path) -> dict[str, dict]:
    """{patientId: {"boxes": [[x0, y0, x1, y1], ...], "target": 0|1, "problem": None|(reason, detail)}}."""
    out: dict[str, dict] = {}
    for n, row in enumerate(read_csv(path, COLUMNS), 2):
        pid = row["patientId"].strip()
        entry = out.setdefault(pid, {"boxes": [], "target": 0, "problem": None})
        target = row["Target"].strip()
        if target not in ("0", "1"):
            entry["problem"] = ("bad_label", f"{path.name} line {n}: Target {target!r}; allowed 0 or 1")
            continue
        if target == "0":
            continue
        try:
            x, y, w, h = (float(row[c]) for c in ("x", "y", "width", "height"))
        except ValueError:
            entry["problem"] = ("bad_label", f"{path.name} line {n}: Target 1 without numeric x, y, width, height")
            continue
        if w <= 0 or h <= 0:
            entry["problem"] = ("bad_label", f"{path.name} line {n}: empty box (width {w}, height {h})")
            continue
        entry["target"] = 1
        entry["boxes"].append([x, y, x + w, y + h])
    return out


@PREPARERS.register("rsna-pneumonia", description="RSNA Pneumonia (Kaggle): DICOMs + opacity boxes (meta.findings)")
class RsnaPneumoniaPreparer(Preparer):
    name = "rsna-pneumonia"
    description = "RSNA Pneumonia Detection: boxes as Consolidation findings"

    def __init__(self, root):
        super().__init__(root)
        self.labels_csv = find_file(self.root, LABEL_FILES, "RSNA Pneumonia labels",
                                    "Point --root at the extracted Kaggle folder (docs/data/rsna-pneumonia.md).")
        self.images = find_dir(self.root, IMAGE_DIRS, "DICOMs")
        self.stats: Counter = Counter()

    def records(self):
        entries = parse_rsna_labels(self.labels_csv)
        classes: dict[str, str] = {}
        info = self.root / "stage_2_detailed_class_info.csv"
        if info.is_file():
            classes = {r["patientId"].strip(): r["class"].strip() for r in read_csv(info, ("patientId", "class"))}
        for pid in sorted(entries):
            e = entries[pid]
            self.stats["boxes"] += len(e["boxes"])
            self.stats["positive" if e["target"] else "negative"] += 1
            meta = {"findings": [{"name": BOX_CLASS, "bbox": b, "source_class": "Lung Opacity"} for b in e["boxes"]]}
            if pid in classes:
                meta["rsna_class"] = classes[pid]
            yield RawRecord(id=pid, image=f"{self.images}/{pid}.dcm", subject_id=pid, study_id=pid, view="",
                            labels={BOX_CLASS: POSITIVE if e["target"] else NEGATIVE}, meta=meta, problem=e["problem"])
