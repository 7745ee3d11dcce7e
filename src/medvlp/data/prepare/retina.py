"""A FLAIR-style retinal image-label folder: fundus photographs with category texts.

FLAIR (Silva-Rodriguez et al., 2023) assembles public fundus datasets, each in its own folder,
and describes them with one CSV per dataset whose ``image`` column holds the path relative to
the data root and whose ``categories`` column holds the image's category texts as a Python
list literal::

    retina/                                  (--root)
      01_EYEPACS/train/13_left.jpeg ...
      02_MESSIDOR/IMAGES/20051020_43808_0100_PP.png ...
      dataframes/01_EYEPACS.csv              image,atributes,categories
      dataframes/02_MESSIDOR.csv             01_EYEPACS/train/13_left.jpeg,[],['no diabetic retinopathy']

Every CSV under ``dataframes/`` (or those given with ``csv``) is read, in sorted order. The
categories (a list literal, or plain text split at ``;`` / ``|``) are kept in
``meta.categories`` and joined into the finding text ("no diabetic retinopathy; drusen"), so
the images pair with text for contrastive training; project labels are empty (the 12 chest
classes do not apply). Colour images stay 8-bit RGB. Subject: the image path without its
extension (the datasets carry no patient ids); ``meta.dataset`` is the first folder. No split
column -> by subject hash; a ``split`` column (train/val/test) is honoured.
"""
from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

from medvlp.data.prepare import PREPARERS
from medvlp.data.prepare.base import Preparer, RawRecord, read_csv
from medvlp.errors import ConfigError

CSV_DIRS = ("dataframes", "local_data/dataframes/pretraining", "")
_SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def parse_categories(cell: str) -> list[str] | None:
    """``"['a', 'b']"`` / ``"a; b"`` / ``"a"`` -> ["a", "b"]; None for a malformed list literal."""
    text = (cell or "").strip()
    if text.startswith("["):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return None
        if not isinstance(value, (list, tuple)):
            return None
        items = [str(v) for v in value]
    else:
        items = re.split(r"[;|]", text)
    return [" ".join(i.split()) for i in items if i and i.strip()]


@PREPARERS.register("retina", description="FLAIR-style retinal folder: fundus images + CSVs of category texts")
class RetinaPreparer(Preparer):
    name = "retina"
    description = "fundus image-label folders (FLAIR dataframes: image, categories)"

    def __init__(self, root, csv: list[str] | None = None):
        super().__init__(root, csv=list(csv or []))
        if csv:
            paths = [Path(c) if Path(c).is_absolute() else self.root / c for c in csv]
            missing = [str(p) for p in paths if not p.is_file()]
            if missing:
                raise ConfigError(f"--csv: file(s) not found: {', '.join(missing)}")
        else:
            folder = next((self.root / d for d in CSV_DIRS if (self.root / d).is_dir()
                           and any((self.root / d).glob("*.csv"))), None)
            if folder is None:
                raise ConfigError(f"--root {self.root}: no dataframes/*.csv with image,categories columns; give "
                                  "them with --csv (docs/data/retina.md)")
            paths = sorted(folder.glob("*.csv"))
        self.csvs = paths
        self.stats: Counter = Counter()

    def records(self):
        for path in self.csvs:
            rows = read_csv(path, ("image", "categories"))
            for n, row in enumerate(rows, 2):
                image = row["image"].strip().lstrip("/")
                cats = parse_categories(row["categories"])
                problem = None
                if cats is None:
                    detail = (f"{path.name} line {n}: categories {row['categories']!r} is not a list "
                              "such as ['no diabetic retinopathy']")
                    problem = ("bad_label", detail)
                elif not cats:
                    problem = ("empty_report", f"{path.name} line {n}: no category")
                if not image:
                    problem = ("missing_file", f"{path.name} line {n}: empty image cell")
                rid = image.rsplit(".", 1)[0] if image else f"{path.stem}/row{n}"
                split = _SPLITS.get((row.get("split") or "").strip().lower())
                self.stats[path.stem] += 1
                yield RawRecord(id=rid, image=image, subject_id=rid, study_id=rid, split=split,
                                sections={"findings": "; ".join(cats or [])}, labels={},
                                meta={"categories": cats or [], "dataset": image.split("/", 1)[0],
                                      "attributes": (row.get("atributes") or row.get("attributes") or "").strip()},
                                problem=problem)

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--csv", action="append", default=None,
                            help="dataframe CSV (image,categories); repeat for several; default dataframes/*.csv")

    @classmethod
    def options_from_args(cls, args):
        return {"csv": args.csv}
