"""CheXpert (Stanford): ``train.csv`` / ``valid.csv`` + JPG images -> records.

Layout (as downloaded; either the full ``CheXpert-v1.0`` or ``CheXpert-v1.0-small``)::

    CheXpert-v1.0-small/
      train.csv   valid.csv
      train/patient00001/study1/view1_frontal.jpg
      valid/patient64541/study1/view1_frontal.jpg

CSV columns: Path, Sex, Age, Frontal/Lateral, AP/PA and 14 observation columns with
1.0 / 0.0 / -1.0 / blank. ``Path`` starts with the dataset folder's own name. The patient id
comes from the path (``patientNNNNN``), the study id is ``patientNNNNN/studyM``. Observations
whose name is a project class become labels; the other five (Enlarged Cardiomediastinum, Lung
Opacity, Lung Lesion, Pneumonia, Pleural Other) are kept in ``meta["labels_extra"]``.
train.csv -> split "train", valid.csv -> "val". Frontal views only unless ``views="all"``.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from medvlp.data.prepare import PREPARERS
from medvlp.data.prepare.base import (
    Preparer,
    RawRecord,
    gc_paused,
    parse_labels,
    read_csv,
)
from medvlp.errors import ConfigError

OBSERVATIONS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                "Fracture", "Support Devices")
REQUIRED = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *OBSERVATIONS)
SPLIT_FILES = (("train.csv", "train"), ("valid.csv", "val"))
FOLDERS = ("CheXpert-v1.0-small", "CheXpert-v1.0")


def class_columns() -> tuple[dict[str, str], dict[str, str]]:
    """(observation -> project class for matching names, the other observations)."""
    from medvlp.data.synth.findings import CLASSES

    matched = {o: o for o in OBSERVATIONS if o in CLASSES}
    return matched, {o: o for o in OBSERVATIONS if o not in CLASSES}


def parse_chexpert_csv(path: Path, split: str, stats: Counter | None = None) -> list[RawRecord]:
    """Every row of a CheXpert CSV as a record (image path relative to the dataset folder)."""
    matched, extra = class_columns()
    with gc_paused():
        records = [_record(row, split, matched, extra, stats) for row in read_csv(path, REQUIRED)]
    return records


def _record(row: dict[str, str], split: str, matched: dict, extra: dict, stats: Counter | None) -> RawRecord:
    """One CSV row -> a record; the patient and study ids are the path's folder names."""
    image = row["Path"].split("/", 1)[1] if row["Path"].startswith(FOLDERS) else row["Path"]
    parts = image.split("/")
    ok = len(parts) >= 4 and parts[1].startswith("patient") and parts[2].startswith("study")
    frontal = row["Frontal/Lateral"].strip().lower() == "frontal"
    labels, problem = parse_labels(row, matched)
    other, problem2 = parse_labels(row, extra)
    if not ok:
        problem = problem or ("bad_path", f"Path {row['Path']!r} has no patientNNNNN/studyN folders")
    age = row["Age"].strip()
    rec = RawRecord(
        id=image.rsplit(".", 1)[0], image=image, subject_id=parts[1] if ok else None,
        study_id=f"{parts[1]}/{parts[2]}" if ok else None, split=split,
        view=(row["AP/PA"].strip() or "FRONTAL") if frontal else "LATERAL", labels=labels,
        meta={"sex": row["Sex"], "age": int(age) if age.isdigit() else None, "frontal": frontal,
              "labels_extra": other},
        problem=problem or problem2)
    if stats is not None:
        stats["frontal" if frontal else "lateral"] += 1
    return rec


@PREPARERS.register("chexpert", description="CheXpert / CheXpert-small: train.csv + valid.csv, 14 observations")
class CheXpertPreparer(Preparer):
    name = "chexpert"
    description = "CheXpert v1.0 (or -small): JPG images, 14 observation labels, patient ids from the path"

    def __init__(self, root, views: str = "frontal"):
        super().__init__(root, views=views)
        if views not in ("frontal", "all"):
            raise ConfigError(f"--views {views!r}: use 'frontal' (default) or 'all'")
        for sub in ("", *FOLDERS):
            if (self.root / sub / "train.csv").is_file() or (self.root / sub / "valid.csv").is_file():
                self.root = self.root / sub if sub else self.root  # images are relative to the dataset folder
                break
        else:
            raise ConfigError(f"--root {self.root}: no train.csv or valid.csv here nor in {' or '.join(FOLDERS)}/; "
                              "point --root at the extracted CheXpert folder (docs/data/chexpert.md).")
        self.views = views
        self.stats: Counter = Counter()

    def records(self):
        for name, split in SPLIT_FILES:
            path = self.root / name
            if not path.is_file():
                continue
            for rec in parse_chexpert_csv(path, split, self.stats):
                if self.views == "all" or rec.meta["frontal"]:
                    yield rec

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--views", choices=["frontal", "all"], default="frontal",
                            help="keep frontal (AP/PA) images only (default) or all views")

    @classmethod
    def options_from_args(cls, args):
        return {"views": args.views}
