"""ROCO (Radiology Objects in COntext): PubMed Central figures with their captions.

Layout (the GitHub repository ``razorx89/roco-dataset`` after ``python scripts/fetch.py``)::

    roco-dataset/data/
      train/radiology/captions.txt      ROCO_00002<TAB>caption
      train/radiology/dlinks.txt        ROCO_00002<TAB>wget <archive url><TAB>figure.jpg
      train/radiology/images/PMC4083729_AMJCR0005-0237-g002.jpg
      validation/radiology/...   test/radiology/...   (and non-radiology/, ignored by default)

``fetch.py`` names each image ``<PMC id>_<figure file>`` (the archive name without
``.tar.gz`` + "_" + the last dlinks column). Where the repository's later revisions renamed the
files (``dlinks_tp_*_revised.txt``, ``captions_*revised.txt``) those are used when the plain
names are absent; a CSV with columns ``ROCO_ID`` / ``id`` and ``PMC_ID`` / ``name`` (and
optionally ``caption``), such as ``cc_tp_test.csv`` or the Kaggle ``radiologytraindata.csv``,
also maps ids to image files. Records are image-caption pairs: the caption is the finding text,
labels are empty (not "negative": ROCO has no labels). The article (PMC id) is the subject,
since figures of one article often show one patient; split: the official folder
(validation -> "val").
"""
from __future__ import annotations

from collections import Counter

from medvlp.data.prepare import PREPARERS
from medvlp.data.prepare.base import Preparer, RawRecord, read_csv
from medvlp.errors import ConfigError

SPLITS = (("train", "train"), ("validation", "val"), ("test", "test"))


def read_tsv_pairs(path) -> dict[str, str]:
    """``id<TAB>rest`` lines -> {id: rest} (ROCO's captions.txt; blank lines skipped)."""
    out = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if "\t" in line:
            key, rest = line.split("\t", 1)
            out[key.strip()] = rest
    return out


def dlinks_file_names(path) -> dict[str, str]:
    """dlinks.txt -> {ROCO id: image file name as fetch.py saves it (``<PMC id>_<figure>``)}."""
    out = {}
    for key, rest in read_tsv_pairs(path).items():
        parts = rest.split("\t")
        url = parts[0].split()[-1] if parts[0].split() else ""
        pmc = url.rstrip("/").rsplit("/", 1)[-1]
        pmc = pmc[: -len(".tar.gz")] if pmc.endswith(".tar.gz") else pmc.split(".", 1)[0]
        out[key] = f"{pmc}_{parts[-1].strip()}"
    return out


@PREPARERS.register("roco", description="ROCO: PubMed Central radiology figures + captions (image-text pairs)")
class RocoPreparer(Preparer):
    name = "roco"
    description = "ROCO image-caption pairs (train / validation / test, radiology subset by default)"

    def __init__(self, root, subset: str = "radiology"):
        super().__init__(root, subset=subset)
        if subset not in ("radiology", "non-radiology", "all"):
            raise ConfigError(f"--subset {subset!r}: use radiology (default), non-radiology or all")
        for sub in ("", "data", "roco-dataset/data"):
            if any((self.root / sub / s).is_dir() for s, _ in SPLITS):
                self.root = self.root / sub if sub else self.root
                break
        else:
            raise ConfigError(f"--root {self.root}: no train/ validation/ test/ folders (nor under data/); point "
                              "--root at roco-dataset/data (docs/data/roco.md)")
        self.subsets = ("radiology", "non-radiology") if subset == "all" else (subset,)
        self.stats: Counter = Counter()

    def _folder(self, folder):
        """{roco id: (image file name or None, caption)} of one split/subset folder."""
        captions: dict[str, str] = {}
        for name in ("captions.txt", *sorted(p.name for p in folder.glob("captions*.txt"))):
            if (folder / name).is_file():
                captions = read_tsv_pairs(folder / name)
                break
        names: dict[str, str] = {}
        for name in ("dlinks.txt", *sorted(p.name for p in folder.glob("dlinks*.txt"))):
            if (folder / name).is_file():
                names = dlinks_file_names(folder / name)
                break
        for csv in sorted(folder.glob("*.csv")):
            rows = read_csv(csv)
            head = set(rows[0]) if rows else set()
            idc = next((c for c in ("ROCO_ID", "id") if c in head), None)
            namec = next((c for c in ("PMC_ID", "name") if c in head), None)
            if idc and namec:
                for r in rows:
                    names.setdefault(r[idc].strip(), r[namec].strip())
                    if r.get("caption") and r[idc].strip() not in captions:
                        captions[r[idc].strip()] = r["caption"]
        return {k: (names.get(k), c) for k, c in captions.items()}

    def records(self):
        found = False
        for folder_name, split in SPLITS:
            for subset in self.subsets:
                folder = self.root / folder_name / subset
                if not folder.is_dir():
                    continue
                found = True
                entries = self._folder(folder)
                images = folder / "images"
                for roco_id in sorted(entries):
                    file, caption = entries[roco_id]
                    caption = " ".join(caption.split())
                    self.stats[f"{split}_captions"] += 1
                    problem = None
                    if not file:
                        detail = f"{folder_name}/{subset}: {roco_id} has a caption but no image file name (dlinks.txt / CSV)"
                        problem = ("missing_file", detail)
                    pmc = (file or roco_id).split("_", 1)[0]
                    image = (images / (file or f"{roco_id}.jpg")).relative_to(self.root).as_posix()
                    yield RawRecord(id=f"{subset}/{roco_id}", image=image, subject_id=pmc, study_id=pmc,
                                    split=split, sections={"findings": caption}, labels={},
                                    meta={"roco_id": roco_id, "subset": subset, "caption": caption},
                                    problem=problem)
        if not found:
            raise ConfigError(f"{self.root}: no <split>/{'|'.join(self.subsets)}/ folder with captions.txt")

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--subset", choices=["radiology", "non-radiology", "all"], default="radiology",
                            help="which ROCO subset to import (default radiology)")

    @classmethod
    def options_from_args(cls, args):
        return {"subset": args.subset}
