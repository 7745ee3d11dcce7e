"""The generic "folder + CSV" importer for a user's own data.

``--csv`` (relative to ``--root`` or absolute) has one row per image. Columns, with the flag
that renames each (defaults in brackets):

=================  ==================  ==================================================
``--image-col``    [path]              image path relative to ``--root`` (required)
``--report-col``   [report]            free-text report (sections split at FINDINGS: ...)
``--findings-col`` [findings]          or the findings / impression already separated
``--impression-col`` [impression]
``--subject-col``  [subject_id]        the dataset's de-identified subject id
``--study-col``    [study_id]          study id (default: the subject id)
``--split-col``    [split]             train / val / test ...; blank -> by subject hash
``--view-col``     [view]              PA / AP / LATERAL ...
``--id-col``       [id]                unique record id (default: image path w/o suffix)
=================  ==================  ==================================================

Any other column whose name is a project class (case-insensitive: "Cardiomegaly",
"pleural effusion") is a label (1 / 0 / -1 / blank, or positive / negative / uncertain);
the remaining columns are kept as strings in ``meta``, except those whose name looks like a direct
identifier (name, patient id, MRN, birth date, accession, address, phone, e-mail), which are dropped. Without a subject column a DICOM's
subject is the keyed hash of its PatientID (a key is then required) and any other image is
its own subject. Without ``--csv`` every image under ``--root`` is imported, unlabelled.
"""
from __future__ import annotations

from pathlib import Path

from medvlp.data.prepare import PREPARERS
from medvlp.data.prepare.base import Preparer, RawRecord, parse_labels, read_csv
from medvlp.errors import ConfigError

COLUMNS = {"image": "path", "report": "report", "findings": "findings", "impression": "impression",
           "subject": "subject_id", "study": "study_id", "split": "split", "view": "view", "id": "id"}
_SPLIT_ALIASES = {"validate": "val", "valid": "val", "validation": "val"}
# Columns that look like direct identifiers are never copied into meta (a guard, not de-identification).
_IDENTIFYING = ("name", "patientid", "patient_id", "mrn", "birth", "dob", "accession", "address", "phone", "email")


def _identifying(column: str) -> bool:
    norm = column.lower().replace(" ", "")
    return any(word in norm for word in _IDENTIFYING)


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    if path.suffix:
        return False
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


@PREPARERS.register("folder", description="your own data: a folder of images + a CSV (paths, reports, labels)")
class FolderPreparer(Preparer):
    name = "folder"
    description = "generic folder + CSV importer"

    def __init__(self, root, csv: str | None = None, columns: dict[str, str] | None = None):
        cols = dict(COLUMNS, **{k: v for k, v in (columns or {}).items() if v})
        unknown = sorted(set(cols) - set(COLUMNS))
        if unknown:
            raise ConfigError(f"folder importer: unknown column role(s) {', '.join(unknown)}; "
                              f"known: {', '.join(COLUMNS)}")
        super().__init__(root, csv=csv, columns=cols)
        self.csv = None if csv is None else (Path(csv) if Path(csv).is_absolute() else self.root / csv)
        if self.csv is not None and not self.csv.is_file():
            raise ConfigError(f"--csv {csv}: file not found (looked at {self.csv}); give a path relative to --root "
                              "or an absolute one")
        self.cols = cols

    def records(self):
        if self.csv is None:
            yield from self._scan()
            return
        from medvlp.data.synth.findings import CLASSES

        rows = read_csv(self.csv, [self.cols["image"]])
        header = list(rows[0]) if rows else []
        by_lower = {c.lower(): c for c in CLASSES}
        label_cols = {h: by_lower[h.strip().lower()] for h in header if h.strip().lower() in by_lower}
        used = set(self.cols.values()) | set(label_cols)
        for n, row in enumerate(rows, 2):  # line numbers as a spreadsheet shows them (header = 1)
            image = (row.get(self.cols["image"]) or "").strip()
            rid = (row.get(self.cols["id"]) or "").strip() or (image.rsplit(".", 1)[0] if image else f"row{n}")
            labels, problem = parse_labels(row, label_cols)
            if not image:
                problem = ("missing_file", f"{self.csv.name} line {n}: empty {self.cols['image']!r} cell")
            subject = (row.get(self.cols["subject"]) or "").strip() or None
            if subject is None and not _is_dicom(self.root / image):
                subject = rid  # no id to link images: each is its own subject
            findings, impression = (row.get(self.cols[k]) or "" for k in ("findings", "impression"))
            report = row.get(self.cols["report"])
            split = (row.get(self.cols["split"]) or "").strip().lower() or None
            yield RawRecord(
                id=rid, image=image, subject_id=subject, study_id=(row.get(self.cols["study"]) or "").strip() or None,
                split=_SPLIT_ALIASES.get(split, split), view=(row.get(self.cols["view"]) or "").strip().upper(),
                report=report if report is not None and not (findings or impression) else None,
                sections={"findings": findings, "impression": impression} if (findings or impression) else None,
                labels=labels if label_cols else None if (report or findings or impression) else {},
                meta={k: v for k, v in row.items() if k not in used and k is not None and not _identifying(k)},
                problem=problem)

    def _scan(self):
        from medvlp.data.images import SUFFIXES

        suffixes = tuple(SUFFIXES)
        for path in sorted(p for p in self.root.rglob("*") if p.is_file()):
            rel = path.relative_to(self.root).as_posix()
            if not rel.lower().endswith(suffixes) and not (not path.suffix and _is_dicom(path)):
                continue
            rid = rel.rsplit(".", 1)[0] if path.suffix else rel
            yield RawRecord(id=rid, image=rel, subject_id=None if _is_dicom(path) else rid, labels={})

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--csv", default=None, help="CSV with one row per image (relative to --root or absolute); "
                                                        "without it every image under --root is imported")
        for role, default in COLUMNS.items():
            parser.add_argument(f"--{role}-col", default=None, metavar="NAME",
                                help=f"CSV column of the {role} (default {default!r})")

    @classmethod
    def options_from_args(cls, args):
        cols = {role: getattr(args, f"{role}_col") for role in COLUMNS if getattr(args, f"{role}_col", None)}
        return {"csv": args.csv, "columns": cols}
