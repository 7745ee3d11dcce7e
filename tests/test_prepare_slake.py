"""SLAKE preparer: a tiny fixture laid out as Slake1.0 (imgs/xmlabN/source.jpg + split JSONs)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from medvlp.data.manifest import read_manifest
from medvlp.data.prepare import prepare
from medvlp.data.prepare.slake import SlakePreparer
from medvlp.errors import ConfigError
from medvlp.eval.vqa import vqa_pairs_of
from tests.prepare_helpers import png_array, shard_members, write_image


def _q(qid, img_id, question, answer, atype, lang, content="Organ"):
    return {"img_id": img_id, "img_name": f"xmlab{img_id}/source.jpg", "question": question, "answer": answer,
            "q_lang": lang, "location": "Lung", "modality": "X-Ray", "answer_type": atype, "base_type": "vqa",
            "content_type": content, "triple": ["vhead", "_", "_"], "qid": qid}


def _fixture(root):
    splits = {"train.json": [_q(0, 0, "Does the picture contain lung?", "Yes", "CLOSED", "en"),
                             _q(1, 0, "图片中包含肺吗?", "是", "CLOSED", "zh"),
                             _q(2, 0, "What modality is used?", "X-Ray", "OPEN", "en", "Modality"),
                             _q(3, 1, "Where is the abnormality?", "Right Lung, Lower Left", "OPEN", "en",
                                "Position")],
              "validate.json": [_q(4, 2, "Is this a CT?", "No", "CLOSED", "en", "Modality")],
              "test.json": [_q(5, 3, "Which organ is abnormal?", "Heart", "OPEN", "en", "Abnormality")]}
    root.mkdir(parents=True)
    for name, items in splits.items():
        (root / name).write_text(json.dumps(items, ensure_ascii=False))
    for i in range(4):
        write_image(root / f"imgs/xmlab{i}/source.jpg", (36, 36), seed=i, rgb=True)
        write_image(root / f"imgs/xmlab{i}/mask.png", (36, 36), seed=9)  # present in SLAKE, not imported


def test_slake_english_pairs_by_split(tmp_path):
    _fixture(tmp_path / "Slake1.0")
    res = prepare("slake", tmp_path, tmp_path / "out", image_size=24, progress=False)  # root above Slake1.0 works
    assert res.rows == 4 and res.quarantined == 0
    samples = {s.id: s for s in read_manifest(tmp_path / "out")}
    assert {k: s.split for k, s in samples.items()} == {"xmlab0-train": "train", "xmlab1-train": "train",
                                                        "xmlab2-val": "val", "xmlab3-test": "test"}
    first = samples["xmlab0-train"].meta["vqa"]
    assert [q["question"] for q in first] == ["Does the picture contain lung?", "What modality is used?"]
    assert first[0] == {"question": "Does the picture contain lung?", "answer": "yes", "type": "closed",
                        "kind": "organ", "finding": ""}
    assert samples["xmlab1-train"].meta["vqa"][0]["answer"] == "right lung, lower left"
    assert samples["xmlab0-train"].subject_id == "xmlab0" and samples["xmlab0-train"].meta["modality"] == "X-Ray"
    assert len(vqa_pairs_of(list(samples.values()))) == 5
    png = png_array(shard_members(tmp_path / "out")[samples["xmlab0-train"].meta["key"]]["png"])
    assert png.shape == (24, 24, 3) and png.dtype == np.uint8  # colour kept


def test_slake_languages(tmp_path):
    _fixture(tmp_path / "Slake1.0")
    zh = [r for r in SlakePreparer(tmp_path / "Slake1.0", languages="zh").records()]
    assert [r.id for r in zh] == ["xmlab0-train"] and zh[0].meta["vqa"][0]["answer"] == "是"
    both = {r.id: r for r in SlakePreparer(tmp_path / "Slake1.0", languages="all").records()}
    assert [q["lang"] for q in both["xmlab0-train"].meta["vqa"]] == ["en", "zh", "en"]
    with pytest.raises(ConfigError, match="--languages"):
        SlakePreparer(tmp_path / "Slake1.0", languages="fr")
    with pytest.raises(ConfigError, match="train.json"):
        SlakePreparer(tmp_path / "Slake1.0" / "imgs")
