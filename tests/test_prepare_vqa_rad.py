"""VQA-RAD preparer: a tiny fixture laid out as the OSF download (JSON + image folder)."""
from __future__ import annotations

import json

import pytest

from medvlp.data.manifest import read_manifest
from medvlp.data.prepare import prepare
from medvlp.data.prepare.vqa_rad import VqaRadPreparer
from medvlp.errors import ConfigError, DataError
from medvlp.eval.vqa import vqa_pairs_of
from tests.prepare_helpers import quarantine, write_image

JSON = "VQA_RAD Dataset Public.json"


def _q(qid, image, question, answer, atype, qtype, phrase, organ="CHEST"):
    return {"qid": qid, "phrase_type": phrase, "qid_linked_id": f"0{qid}", "image_case_url": "https://x",
            "image_name": image, "image_organ": organ, "evaluation": "not evaluated", "question": question,
            "question_rephrase": "NULL", "question_relation": "NULL", "question_frame": "NULL",
            "question_type": qtype, "answer": answer, "answer_type": atype}


def _fixture(root):
    items = [_q(1, "synpic54610.jpg", "Is there  evidence of an effusion?", "Yes", "CLOSED", "PRES", "freeform"),
             _q(2, "synpic54610.jpg", "Which side is the effusion on?", "Left ", "OPEN", "POS", "para"),
             _q(3, "synpic54610.jpg", "Is the heart enlarged?", "no", "CLOSED", "SIZE", "test_freeform"),
             _q(4, "synpic29265.jpg", "How many ribs are fractured?", 2, "OPEN", "COUNT", "freeform", "CHEST"),
             _q(5, "synpic29265.jpg", "How many ribs are fractured?", 2, "OPEN", "COUNT", "freeform"),  # repeated
             _q(6, "synpic29265.jpg", "Odd one?", "x", "UNKNOWN", "OTHER", "freeform"),
             _q(7, "synpic00000.jpg", "Missing image?", "yes", "CLOSED", "PRES", "freeform", "HEAD")]
    (root / "VQA_RAD Image Folder").mkdir(parents=True)
    (root / JSON).write_text(json.dumps(items))
    write_image(root / "VQA_RAD Image Folder/synpic54610.jpg", (40, 30), seed=1, rgb=True)
    write_image(root / "VQA_RAD Image Folder/synpic29265.jpg", (30, 40), seed=2)


def test_vqa_rad_pairs_in_meta(tmp_path):
    _fixture(tmp_path / "raw")
    res = prepare("vqa-rad", tmp_path / "raw", tmp_path / "out", image_size=32, progress=False)
    assert res.rows == 3 and res.quarantine_reasons == {"missing_file": 1}
    assert "synpic00000-train" in quarantine(tmp_path / "out")
    samples = {s.id: s for s in read_manifest(tmp_path / "out")}
    assert set(samples) == {"synpic54610-train", "synpic54610-test", "synpic29265-train"}
    train = samples["synpic54610-train"]
    assert train.split == "train" and samples["synpic54610-test"].split == "test"
    assert train.subject_id == samples["synpic54610-test"].subject_id == "synpic54610"
    assert train.meta["vqa"] == [
        {"question": "Is there evidence of an effusion?", "answer": "yes", "type": "closed", "kind": "pres",
         "finding": ""},
        {"question": "Which side is the effusion on?", "answer": "left", "type": "open", "kind": "pos", "finding": ""}]
    ribs = samples["synpic29265-train"].meta["vqa"]
    assert ribs == [{"question": "How many ribs are fractured?", "answer": "2", "type": "open", "kind": "count",
                     "finding": ""}]  # numeric answer as text, verbatim repeat kept once, UNKNOWN type dropped
    assert train.meta["organ"] == "CHEST" and train.labels == {}
    pairs = vqa_pairs_of([samples[k] for k in sorted(samples)])
    assert len(pairs) == 4 and {q["type"] for _, q in pairs} == {"closed", "open"}


def test_vqa_rad_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match="VQA_RAD Dataset Public.json"):
        VqaRadPreparer(tmp_path)
    (tmp_path / JSON).write_text(json.dumps([{"image_name": "a.jpg", "question": "q?"}]))
    with pytest.raises(DataError, match="lacks answer, answer_type"):
        list(VqaRadPreparer(tmp_path).records())
    (tmp_path / JSON).write_text("{not json")
    with pytest.raises(DataError, match="cannot read the JSON"):
        list(VqaRadPreparer(tmp_path).records())
