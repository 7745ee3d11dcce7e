"""SLAKE: a bilingual (English / Chinese) medical VQA dataset.

Layout (``Slake1.0`` as distributed)::

    Slake1.0/                                    (--root)
      train.json  validate.json  test.json
      imgs/xmlab0/source.jpg  (also mask.png, detection.json: not imported here)

Each JSON is a list of questions with ``img_name`` ("xmlab0/source.jpg"), ``question``,
``answer``, ``answer_type`` (OPEN / CLOSED), ``q_lang`` ("en" / "zh"), ``content_type``
(Organ, Position, Abnormality, Modality, ...), ``modality`` and ``location``. English questions
only by default (``languages="en"``; "zh" or "all" otherwise). One record per (image, split)
with its pairs in ``meta["vqa"]`` in the SynthCXR format (see :mod:`.vqa_rad`); the xmlab
folder is the subject; the split is the file (validate.json -> "val").
"""
from __future__ import annotations

from collections import Counter

from medvlp.data.prepare import PREPARERS
from medvlp.data.prepare.base import Preparer, RawRecord
from medvlp.data.prepare.vqa_rad import load_json_list, require_keys, vqa_pair
from medvlp.errors import ConfigError

SPLIT_FILES = (("train.json", "train"), ("validate.json", "val"), ("test.json", "test"))


@PREPARERS.register("slake", description="SLAKE (Slake1.0): bilingual medical VQA, English by default (meta.vqa)")
class SlakePreparer(Preparer):
    name = "slake"
    description = "SLAKE question-answer pairs, official train / validate / test split"

    def __init__(self, root, languages: str = "en"):
        super().__init__(root, languages=languages)
        if languages not in ("en", "zh", "all"):
            raise ConfigError(f"--languages {languages!r}: use en (default), zh or all")
        if not (self.root / "train.json").is_file() and (self.root / "Slake1.0" / "train.json").is_file():
            self.root = self.root / "Slake1.0"
        if not any((self.root / name).is_file() for name, _ in SPLIT_FILES):
            raise ConfigError(f"--root {self.root}: no train.json / validate.json / test.json; point --root at the "
                              "extracted Slake1.0 folder (docs/data/slake.md)")
        self.languages = languages
        self.stats: Counter = Counter()

    def records(self):
        for name, split in SPLIT_FILES:
            path = self.root / name
            if not path.is_file():
                continue
            items = load_json_list(path)
            require_keys(items, ("img_name", "question", "answer", "answer_type", "q_lang"), path)
            groups: dict[str, dict] = {}
            for item in items:
                lang = str(item["q_lang"]).strip().lower()
                if self.languages != "all" and lang != self.languages:
                    self.stats[f"pairs_{lang}_skipped"] += 1
                    continue
                pair = vqa_pair(item["question"], item["answer"], item["answer_type"], item.get("content_type"))
                if pair is None:
                    self.stats["pairs_bad_answer_type"] += 1
                    continue
                if self.languages == "all":
                    pair["lang"] = lang
                group = groups.setdefault(str(item["img_name"]).strip(), {
                    "pairs": [], "modality": str(item.get("modality", "")), "location": str(item.get("location", ""))})
                group["pairs"].append(pair)
                self.stats[f"{split}_pairs"] += 1
            for image in sorted(groups):
                folder = image.split("/", 1)[0]
                g = groups[image]
                yield RawRecord(id=f"{folder}-{split}", image=f"imgs/{image}", subject_id=folder, study_id=folder,
                                split=split, labels={},
                                meta={"vqa": g["pairs"], "modality": g["modality"], "location": g["location"]})

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--languages", choices=["en", "zh", "all"], default="en",
                            help="question language(s) to keep (default en)")

    @classmethod
    def options_from_args(cls, args):
        return {"languages": args.languages}
