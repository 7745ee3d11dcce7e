"""MIMIC-CXR (JPG or DICOM) -> records, with the official split, view filter and label CSV.

Layout (PhysioNet MIMIC-CXR-JPG 2.0.0; MIMIC-CXR 2.0.0 has the same tree with ``.dcm`` and
holds the reports)::

    ROOT/mimic-cxr-2.0.0-split.csv(.gz)      dicom_id, study_id, subject_id, split
    ROOT/mimic-cxr-2.0.0-metadata.csv(.gz)   dicom_id, subject_id, study_id, ViewPosition, ...
    ROOT/mimic-cxr-2.0.0-chexpert.csv(.gz)   subject_id, study_id, 14 observations (optional)
    ROOT/files/p10/p10000032/s50414267/02aa804e-....jpg   (or .dcm)
    REPORTS/files/p10/p10000032/s50414267.txt             (REPORTS defaults to ROOT)

Subject and study ids are MIMIC's own. Split "validate" becomes "val". Views: frontal (PA, AP)
by default, ``all``, or a comma list of ViewPosition values. Labels: the CheXpert CSV where it
has the study (matching names; others in ``meta["labels_extra"]``), else the project's labeller
on the report. ``reports="none"`` prepares images and CSV labels only.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from medvlp.data.prepare import PREPARERS
from medvlp.data.prepare.base import (
    Preparer,
    RawRecord,
    find_file,
    parse_labels,
    read_csv,
)
from medvlp.data.prepare.chexpert import OBSERVATIONS, class_columns
from medvlp.errors import ConfigError

PREFIX = "mimic-cxr-2.0.0"
FRONTAL = ("PA", "AP")
SPLITS = {"train": "train", "validate": "val", "test": "test"}


@PREPARERS.register("mimic-cxr", description="MIMIC-CXR(-JPG) 2.0.0: official split, frontal views, CheXpert labels")
class MimicCXRPreparer(Preparer):
    name = "mimic-cxr"
    description = "MIMIC-CXR-JPG / MIMIC-CXR 2.0.0 with free-text reports"

    def __init__(self, root, views: str = "frontal", reports: str | None = None, image_format: str = "auto"):
        super().__init__(root, views=views, reports=reports, image_format=image_format)
        if image_format not in ("auto", "jpg", "dcm"):
            raise ConfigError(f"--image-format {image_format!r}: use auto, jpg or dcm")
        self.views = None if views == "all" else set(FRONTAL if views == "frontal" else
                                                     (v.strip().upper() for v in views.split(",") if v.strip()))
        if self.views is not None and not self.views:
            raise ConfigError("--views: empty list; use frontal, all or e.g. PA,AP,LATERAL")
        self.reports = None if reports == "none" else Path(reports).expanduser() if reports else self.root
        if self.reports is not None and not self.reports.is_dir():
            raise ConfigError(f"--reports {self.reports}: folder not found (it holds files/pXX/pY/sZ.txt), "
                              "or pass --reports none")
        self.image_format = image_format
        self.stats: Counter = Counter()

    def records(self):
        fix = "Download the CSVs of MIMIC-CXR-JPG 2.0.0 from PhysioNet into --root (docs/data/mimic-cxr.md)."
        split_rows = read_csv(find_file(self.root, [f"{PREFIX}-split.csv"], "MIMIC-CXR split", fix),
                              ("dicom_id", "study_id", "subject_id", "split"))
        meta_rows = read_csv(find_file(self.root, [f"{PREFIX}-metadata.csv"], "MIMIC-CXR metadata", fix),
                             ("dicom_id", "ViewPosition"))
        meta = {r["dicom_id"]: r for r in meta_rows}
        labels = self._labels(fix)
        matched, extra = class_columns()
        suffix = self._suffix(split_rows)
        split_rows.sort(key=lambda r: (int(r["subject_id"]), int(r["study_id"]), r["dicom_id"]))
        for row in split_rows:
            subject, study, dicom_id = row["subject_id"], row["study_id"], row["dicom_id"]
            view = (meta.get(dicom_id, {}).get("ViewPosition") or "").strip().upper()
            if self.views is not None and view not in self.views:
                self.stats["filtered_view"] += 1
                continue
            folder = f"files/p{subject[:2]}/p{subject}/s{study}"
            label_row = labels.get((subject, study))
            rec_labels, other, problem = None, {}, None
            if label_row is not None:
                rec_labels, problem = parse_labels(label_row, matched)
                other, problem2 = parse_labels(label_row, extra)
                problem = problem or problem2
            report_file = None if self.reports is None else str(self.reports / f"{folder}.txt")
            yield RawRecord(
                id=dicom_id, image=f"{folder}/{dicom_id}{suffix}", subject_id=subject, study_id=study,
                split=SPLITS.get(row["split"].strip(), row["split"].strip()), view=view,
                report_file=report_file, labels=rec_labels if rec_labels is not None or report_file else {},
                meta={"dicom_id": dicom_id, "labels_extra": other,
                      "procedure": meta.get(dicom_id, {}).get("PerformedProcedureStepDescription", "")},
                problem=problem)

    def _labels(self, fix: str) -> dict[tuple[str, str], dict[str, str]]:
        try:
            path = find_file(self.root, [f"{PREFIX}-chexpert.csv"], "MIMIC-CXR labels", fix)
        except ConfigError:
            if self.reports is None:
                raise ConfigError(f"{self.root}: no {PREFIX}-chexpert.csv and --reports none: nothing would give "
                                  "labels or text. Add the CSV or the reports.") from None
            return {}  # the labeller reads the reports instead
        return {(r["subject_id"], r["study_id"]): r
                for r in read_csv(path, ("subject_id", "study_id", *OBSERVATIONS))}

    def _suffix(self, rows: list[dict]) -> str:
        if self.image_format != "auto":
            return "." + self.image_format
        for r in rows[:50]:  # the first files that exist tell which layout this is
            folder = self.root / f"files/p{r['subject_id'][:2]}/p{r['subject_id']}/s{r['study_id']}"
            for suffix in (".jpg", ".dcm"):
                if (folder / f"{r['dicom_id']}{suffix}").is_file():
                    return suffix
        return ".jpg"

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--views", default="frontal",
                            help="frontal (PA and AP, default), all, or a comma list of ViewPosition values")
        parser.add_argument("--reports", default=None,
                            help="folder holding files/pXX/pY/sZ.txt (default: --root); 'none' for images + labels only")
        parser.add_argument("--image-format", choices=["auto", "jpg", "dcm"], default="auto",
                            help="MIMIC-CXR-JPG (.jpg) or MIMIC-CXR DICOM (.dcm); auto looks at the files")

    @classmethod
    def options_from_args(cls, args):
        return {"views": args.views, "reports": args.reports, "image_format": args.image_format}
