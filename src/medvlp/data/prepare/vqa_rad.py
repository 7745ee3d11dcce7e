"""VQA-RAD: radiology images with clinician-written question-answer pairs.

Layout (the OSF download, extracted)::

    vqa-rad/                                     (--root)
      VQA_RAD Dataset Public.json
      VQA_RAD Image Folder/synpic54610.jpg ...

The JSON is a list of questions with ``image_name``, ``question``, ``answer`` (text or a
number), ``answer_type`` (CLOSED / OPEN), ``question_type`` (PRES, POS, ABN, MODALITY, ...),
``phrase_type`` (freeform / para for training questions, test_freeform / test_para for the
official test set) and ``image_organ``. One record per (image, split) holds all its pairs in
``meta["vqa"]`` exactly as SynthCXR stores them (``{question, answer, type: closed|open, kind,
finding}``; answers lower-cased and stripped), which :func:`medvlp.eval.vqa.vqa_pairs_of`
reads. The image (synpic id) is the subject. Pitfall: the official test questions ask about
images that also have training questions, so the ``train`` and ``test`` records of an image
share a subject; the split is the official one, kept as is.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from medvlp.data.prepare import PREPARERS
from medvlp.data.prepare.base import Preparer, RawRecord
from medvlp.errors import ConfigError, DataError

JSON_NAMES = ("VQA_RAD Dataset Public.json", "VQA_RAD_Dataset_Public.json")
IMAGE_DIRS = ("VQA_RAD Image Folder", "VQA_RAD_Image_Folder", "images")


def load_json_list(path: Path) -> list[dict]:
    """A JSON file holding a list of objects; a clear error otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read the JSON ({exc}); re-download or re-extract it.") from exc
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise DataError(f"{path}: expected a JSON list of question objects")
    return data


def vqa_pair(question, answer, answer_type, kind) -> dict | None:
    """One pair in the SynthCXR ``meta["vqa"]`` format, or None when the type is not closed / open."""
    qtype = str(answer_type or "").strip().lower()
    if qtype not in ("closed", "open"):
        return None
    return {"question": " ".join(str(question or "").split()), "answer": " ".join(str(answer).split()).lower(),
            "type": qtype, "kind": " ".join(str(kind or "").split()).lower(), "finding": ""}


def require_keys(items: list[dict], keys, path: Path) -> None:
    for n, item in enumerate(items):
        missing = [k for k in keys if k not in item]
        if missing:
            raise DataError(f"{path}: question #{n} lacks {', '.join(missing)} (found {', '.join(sorted(item))}); "
                            "use the file as distributed")


@PREPARERS.register("vqa-rad", description="VQA-RAD: radiology images with question-answer pairs (meta.vqa)")
class VqaRadPreparer(Preparer):
    name = "vqa-rad"
    description = "VQA-RAD question-answer pairs, official train / test split"

    def __init__(self, root):
        super().__init__(root)
        self.json = next((self.root / n for n in JSON_NAMES if (self.root / n).is_file()), None)
        if self.json is None:
            raise ConfigError(f"--root {self.root}: no {JSON_NAMES[0]!r}; point --root at the extracted VQA-RAD "
                              "folder (docs/data/vqa-rad.md)")
        self.images = next((d for d in IMAGE_DIRS if (self.root / d).is_dir()), IMAGE_DIRS[0])
        self.stats: Counter = Counter()

    def records(self):
        items = load_json_list(self.json)
        require_keys(items, ("image_name", "question", "answer", "answer_type"), self.json)
        groups: dict[tuple[str, str], dict] = {}
        for item in items:
            split = "test" if str(item.get("phrase_type", "")).strip().lower().startswith("test") else "train"
            pair = vqa_pair(item["question"], item["answer"], item["answer_type"], item.get("question_type"))
            if pair is None:
                self.stats["pairs_bad_answer_type"] += 1
                continue
            image = str(item["image_name"]).strip()
            group = groups.setdefault((image, split), {"pairs": [], "organ": str(item.get("image_organ", "")).strip()})
            if pair not in group["pairs"]:  # the JSON repeats some question-answer pairs verbatim
                group["pairs"].append(pair)
            self.stats[f"{split}_pairs"] += 1
        for (image, split), group in sorted(groups.items()):
            stem = image.rsplit(".", 1)[0]
            yield RawRecord(id=f"{stem}-{split}", image=f"{self.images}/{image}", subject_id=stem, study_id=stem,
                            split=split, labels={}, meta={"vqa": group["pairs"], "organ": group["organ"]})
