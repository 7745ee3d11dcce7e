"""VQA answer classification: a constant image encoder scores at the question-only level while
informative synthetic features beat both baselines; the fused hook is used when present;
accuracies by hand; a tiny CLIP end to end on the tiny SynthCXR fixture."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medvlp.config import load_config
from medvlp.data.loader import make_loader
from medvlp.data.manifest import read_info, read_manifest
from medvlp.data.sample import POSITIVE
from medvlp.data.tokenize import train_wordpiece
from medvlp.eval.vqa import accuracies, evaluate_vqa, vqa_pairs_of
from tests.conftest import TINY


def test_accuracies_by_hand():
    correct = np.array([1, 0, 1, 1], dtype=float)
    types = np.array(["closed", "closed", "open", "open"])
    kinds = np.array(["presence", "presence", "side", "count"])
    acc = accuracies(correct, types, kinds)
    assert (acc["closed"], acc["open"], acc["overall"]) == (0.5, 1.0, 0.75)
    assert acc["per_kind"] == {"count": 1.0, "presence": 0.5, "side": 1.0}


def _setup(tiny_dataset, tmp_path, recipe="configs/experiments/demo.yaml"):
    cfg = load_config(recipe, [*TINY, f"data.manifest={tiny_dataset}", f"train.output_dir={tmp_path / 'run'}"])
    # the pre-training split is the largest of the tiny fixture: a better-posed head training set
    return cfg, read_manifest(tiny_dataset, ["pretrain"]), read_manifest(tiny_dataset, ["test"])


class _FakeModel(nn.Module):
    """An image-only model whose features come from a lookup ``image bytes -> vector``."""

    supports_text = False

    def __init__(self, table=None, dim=12):
        super().__init__()
        self.table, self.dim = table, dim

    def image_features(self, images):
        if self.table is None:
            return torch.ones(len(images), self.dim)
        return torch.stack([self.table[x.numpy().tobytes()] for x in images])


def _label_table(samples, cfg, tok, classes):
    """Image -> its positive-label indicator vector (what a perfect image encoder would know)."""
    table = {}
    for batch in make_loader(samples, cfg, tok, classes, batch_size=64):
        for img, codes in zip(batch.images, batch.labels):
            table[img.numpy().tobytes()] = (codes == POSITIVE).float()
    return table


def test_constant_image_features_score_question_only_and_informative_ones_beat_both(tiny_dataset, tmp_path):
    cfg, train, test = _setup(tiny_dataset, tmp_path)
    classes = read_info(tiny_dataset)["classes"]
    tok = train_wordpiece(["the lungs are clear."], 64)
    const = evaluate_vqa(_FakeModel(), tok, train, test, cfg)
    assert const["question_features"] == "bag_of_words" and const["features"].startswith("dual")
    # constant features carry nothing: the head answers from the question alone
    assert const["model"]["overall"]["mean"] == pytest.approx(const["question_only"]["overall"]["mean"], abs=0.04)
    assert const["model"]["closed"]["mean"] < 0.7
    assert const["image_shuffled"]["overall"]["mean"] == const["model"]["overall"]["mean"]

    table = _label_table(train + test, cfg, tok, classes)
    informed = evaluate_vqa(_FakeModel(table), tok, train, test, cfg)
    closed = {k: informed[k]["closed"]["mean"] for k in ("model", "question_only", "image_shuffled")}
    assert closed["model"] > 0.7
    assert closed["model"] > closed["question_only"] + 0.15 and closed["model"] > closed["image_shuffled"] + 0.15
    assert informed["model"]["overall"]["mean"] > const["model"]["overall"]["mean"] + 0.1


class _FusedModel(_FakeModel):
    """A model with the fusion hook: the feature is 'is the asked finding present in this image'."""

    def __init__(self, table, tok, finding_of_token):
        super().__init__(table)
        self.tok, self.finding_of_token = tok, finding_of_token
        self.calls = 0

    def vqa_features(self, images, input_ids, attention_mask):
        self.calls += 1
        labels = self.image_features(images)
        asked = torch.stack([self.finding_of_token(ids) for ids in input_ids])  # (B, K) one-hot or zero
        return torch.cat([(labels * asked).sum(1, keepdim=True), asked], 1)


def test_fused_hook_is_used(tiny_dataset, tmp_path):
    cfg, train, test = _setup(tiny_dataset, tmp_path)
    classes = read_info(tiny_dataset)["classes"]
    questions = sorted({q["question"] for _, q in vqa_pairs_of(train + test)})
    tok = train_wordpiece(questions + ["the lungs are clear."], 200)
    key = {}
    for _, q in vqa_pairs_of(train + test):
        if q["kind"] == "presence":
            key[q["question"]] = classes.index(q["finding"])

    def finding_of_token(ids):
        text = tok.decode([int(i) for i in ids], skip_special_tokens=True)
        match = [v for q, v in key.items() if q.lower().replace(" ", "") == text.replace(" ", "")]
        return nn.functional.one_hot(torch.tensor(match[0]), len(classes)).float() if match else torch.zeros(len(classes))

    model = _FusedModel(_label_table(train + test, cfg, tok, classes), tok, finding_of_token)
    res = evaluate_vqa(model, tok, train, test, cfg, seeds=(3,))
    assert model.calls > 0 and res["features"].startswith("fused")
    assert res["model"]["closed"]["mean"] > 0.9 > res["image_shuffled"]["closed"]["mean"]
    assert res["seeds"] == [3] and len(res["model"]["closed"]["per_seed"]) == 1


def test_tiny_clip_end_to_end(tiny_dataset, tmp_path):
    from medvlp.hub import build_method

    cfg, _, test = _setup(tiny_dataset, tmp_path, "configs/methods/clip.yaml")
    train = read_manifest(tiny_dataset, ["train"])
    tok = train_wordpiece([s.text() for s in train] + [q["question"] for _, q in vqa_pairs_of(train)], 300)
    model = build_method(cfg, tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = evaluate_vqa(model, tok, train, test, cfg)
    assert res["question_features"] == "text_tower" and "patch-token mean" in res["features"]
    train_answers = {q["answer"] for _, q in vqa_pairs_of(train)}
    assert res["answers"] == sorted(train_answers)
    assert res["n_test_unseen_answers"] == sum(q["answer"] not in train_answers for _, q in vqa_pairs_of(test))
    assert res["n_test_pairs"] == len(vqa_pairs_of(test))
    for name in ("model", "question_only", "image_shuffled"):
        for key in ("closed", "open", "overall"):
            assert 0.0 <= res[name][key]["mean"] <= 1.0
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_evaluate_cli_runs_vqa_finetune_and_segmentation(tiny_dataset, tmp_path):
    import json

    from medvlp.cli import main
    from tests.conftest import TINY

    run = tmp_path / "run"
    assert main(["pretrain", "--config", "configs/methods/clip.yaml", *TINY, f"data.manifest={tiny_dataset}",
                 f"train.output_dir={run}", "data.train_split=pretrain", "train.steps=2"]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--out", str(out), "--tasks", "vqa,finetune,segmentation,detection",
                 "--overrides", "eval.fractions=[1.0]"]) == 0
    m = json.loads((out / "metrics.json").read_text())["run"]
    assert {"vqa", "finetune", "segmentation", "detection"} <= set(m), sorted(m)
    assert 0.0 <= m["vqa"]["model"]["overall"]["mean"] <= 1.0 and "question_only" in m["vqa"]
    report = (out / "report.md").read_text()
    assert "VQA overall accuracy" in report and "fine-tuning AUROC @100%" in report and "segmentation Dice" in report
    assert "detection mAP@0.5 @100%" in report


def test_malformed_pairs_name_the_sample_and_field():
    """A pair without an answer or with an unknown type is a DataError naming the sample and the
    field (not a KeyError deep in the task); the kind may be absent."""
    from medvlp.data.sample import Sample
    from medvlp.errors import DataError
    from medvlp.eval.vqa import vqa_pairs_of

    def sample(*pairs):
        return Sample(id="s3", subject_id="p", study_id="t", split="test", meta={"vqa": list(pairs)})

    ok = {"question": "is there a nodule?", "answer": "yes", "type": "closed"}
    assert vqa_pairs_of([sample(), sample(ok, {**ok, "kind": "presence"})]) == [(1, ok), (1, {**ok, "kind": "presence"})]
    with pytest.raises(DataError, match=r"sample s3: meta\.vqa pair .* lacks a non-empty string answer"):
        vqa_pairs_of([sample({"question": "q", "type": "open"})])
    with pytest.raises(DataError, match=r"sample s3: .*lacks a non-empty string question, answer, type"):
        vqa_pairs_of([sample("yes")])
    with pytest.raises(DataError, match=r"sample s3: meta\.vqa pair type 'Closed' is not closed or open"):
        vqa_pairs_of([sample({**ok, "type": "Closed"})])
