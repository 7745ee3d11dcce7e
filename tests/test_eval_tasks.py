"""Zero-shot, linear probe, report and runner of medvlp.eval on tiny synthetic inputs.

The runner tests replace the data loader and tokeniser with stubs defined here (label
codes drive a 4-d "image", keywords drive a 4-d "text"), so they test orchestration,
refusals and outputs without images or a trained model.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medvlp.config import ExperimentConfig
from medvlp.data.manifest import read_manifest, write_manifest
from medvlp.data.sample import hash_subject, MISSING, POSITIVE, UNCERTAIN, Batch, Sample
from medvlp.errors import EvaluationError
from medvlp.eval import runner
from medvlp.eval.linear_probe import evaluate_linear_probe, make_fraction_splits
from medvlp.eval.report import format_table, write_report
from medvlp.eval.zeroshot import evaluate_zero_shot, zero_shot_scores

CLASSES = ["Cardiomegaly", "Pleural Effusion"]
PROMPTS = {
    "Cardiomegaly": {"positive": ["cardiomegaly present.", "big heart present."], "negative": ["cardiomegaly absent."]},
    "Pleural Effusion": {"positive": ["effusion present."], "negative": ["effusion absent.", "no effusion absent."]},
}
KEYWORDS = ["cardiomegaly present", "cardiomegaly absent", "effusion present", "effusion absent"]


def keyword_vectors(texts: list[str]) -> torch.Tensor:
    """A stub text 'encoder': one axis per keyword (big heart counts as cardiomegaly)."""
    rows = [[float(k in t.lower() or (i == 0 and "big heart" in t.lower())) for i, k in enumerate(KEYWORDS)] for t in texts]
    return torch.tensor(rows)


def label_vectors(labels: torch.Tensor) -> torch.Tensor:
    """A stub 'image': (present, absent) per class, aligned with the keyword axes."""
    pos = (labels == POSITIVE).float()
    return torch.stack([pos[:, 0], 1 - pos[:, 0], pos[:, 1], 1 - pos[:, 1]], dim=1)


def random_labels(n: int, k: int, seed: int, p: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, k, generator=g) < p).long()
    labels[torch.rand(n, k, generator=g) < 0.1] = UNCERTAIN
    labels[torch.rand(n, k, generator=g) < 0.05] = MISSING
    return labels


# ----------------------------------------------------------------------------- zero-shot


def test_zero_shot_constant_encoder_gives_chance():
    labels = random_labels(40, 2, seed=0)
    image = F.normalize(torch.ones(40, 4), dim=1)
    encode = lambda texts: F.normalize(torch.ones(len(texts), 4), dim=1)  # noqa: E731
    out = evaluate_zero_shot(image, encode, labels, CLASSES, PROMPTS)
    assert out["per_class"] == {c: 0.5 for c in CLASSES} and out["mean"] == 0.5


def test_zero_shot_perfect_encoder_gives_one_and_probabilities():
    labels = random_labels(40, 2, seed=1)
    image = F.normalize(label_vectors(labels) + 0.01 * torch.randn(40, 4), dim=1)
    encode = lambda texts: F.normalize(keyword_vectors(texts), dim=1)  # noqa: E731
    out = evaluate_zero_shot(image, encode, labels, CLASSES, PROMPTS, logit_scale=100.0)
    assert out["mean"] == 1.0 and set(out["roc"]) == set(CLASSES)
    scores = zero_shot_scores(image, encode, CLASSES, PROMPTS, logit_scale=2.0)
    assert scores.shape == (40, 2) and bool(((scores > 0) & (scores < 1)).all())
    # softmax over [pos, neg] at the positive entry, checked against an explicit computation
    pos = F.normalize(keyword_vectors(["cardiomegaly present.", "big heart present."]).mean(0), dim=0)
    neg = F.normalize(keyword_vectors(["cardiomegaly absent."])[0], dim=0)
    expected = torch.softmax(2.0 * torch.stack([image @ pos, image @ neg], dim=1), dim=1)[:, 0]
    assert torch.allclose(scores[:, 0], expected, atol=1e-5)


class _LearnedPromptStub(nn.Module):
    """A model whose learned prompts are given: pos / neg per class, for Cardiomegaly only."""

    learned_prompt_classes = ["Cardiomegaly"]

    def __init__(self, swap: bool):
        super().__init__()
        self.swap = swap

    def class_text_embeddings(self, classes):
        assert classes == ["Cardiomegaly"]
        pos, neg = torch.tensor([[1.0, 0.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0, 0.0]])
        return (neg, pos) if self.swap else (pos, neg)


def test_zero_shot_with_learned_prompts_scores_the_models_own_prompt_embeddings():
    labels = random_labels(40, 2, seed=4)
    emb = runner.SplitEmbeddings(ids=[str(i) for i in range(40)], subject_ids=[str(i) for i in range(40)],
                                 texts=[""] * 40, labels=labels, image_emb=F.normalize(label_vectors(labels), dim=1))
    right = runner._zero_shot_learned(_LearnedPromptStub(swap=False), emb, CLASSES, 10.0)
    swapped = runner._zero_shot_learned(_LearnedPromptStub(swap=True), emb, CLASSES, 10.0)
    assert right["prompts"] == "learned" and right["not_scored"] == ["Pleural Effusion"]
    assert set(right["per_class"]) == {"Cardiomegaly"}
    assert right["mean"] == pytest.approx(1.0) and swapped["mean"] == pytest.approx(0.0)


def test_zero_shot_rejects_missing_prompts():
    with pytest.raises(EvaluationError, match="Edema"):
        zero_shot_scores(torch.eye(4), keyword_vectors, ["Edema"], PROMPTS)


# ----------------------------------------------------------------------------- fraction splits


def _pool(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 4)) < np.array([0.3, 0.1, 0.02, 0.001])).astype(int)
    labels[rng.random((n, 4)) < 0.1] = UNCERTAIN
    return [f"s{i}" for i in range(n)], labels


def test_fraction_splits_nested_deterministic_min_positives_stratified():
    ids, labels = _pool()
    fractions = [0.01, 0.1, 1.0]
    a = make_fraction_splits(ids, labels, fractions, min_positives=5, seed=3)
    assert a == make_fraction_splits(ids, labels, fractions, min_positives=5, seed=3)
    assert a[0.01] != make_fraction_splits(ids, labels, fractions, min_positives=5, seed=4)[0.01]
    assert set(a[0.01]) <= set(a[0.1]) <= set(a[1.0]) == set(ids)
    assert all(len(v) == len(set(v)) for v in a.values())
    row = {s: i for i, s in enumerate(ids)}
    pool_pos = (labels == POSITIVE).sum(0)
    for frac, chosen in a.items():
        assert len(chosen) >= round(frac * len(ids))
        pos = (labels[[row[s] for s in chosen]] == POSITIVE).sum(0)
        for k in range(4):
            if pool_pos[k] >= 5:
                assert pos[k] >= 5, (frac, k)
    assert len(a[0.01]) <= 20 + 3 * 5  # prefix + at most the top-up
    ten = labels[[row[s] for s in a[0.1]]]
    assert np.abs((ten == POSITIVE).mean(0)[:2] - (labels == POSITIVE).mean(0)[:2]).max() < 0.03


# ----------------------------------------------------------------------------- linear probe


def _probe_data(separable: bool, seed=0, n_train=300, n_test=200, dim=8):
    rng = np.random.default_rng(seed)
    y_tr = (rng.random((n_train, 2)) < 0.4).astype(int)
    y_te = (rng.random((n_test, 2)) < 0.4).astype(int)
    x_tr, x_te = rng.normal(size=(n_train, dim)), rng.normal(size=(n_test, dim))
    if separable:
        x_tr[:, :2] += 4 * y_tr
        x_te[:, :2] += 4 * y_te
    y_tr[rng.random((n_train, 2)) < 0.1] = UNCERTAIN
    return x_tr, y_tr, [f"t{i}" for i in range(n_train)], x_te, y_te


def test_linear_probe_separable_features_and_split_files(tmp_path):
    x_tr, y_tr, ids, x_te, y_te = _probe_data(separable=True)
    out = evaluate_linear_probe(x_tr, y_tr, ids, x_te, y_te, CLASSES, [0.1, 1.0], 3, 2, tmp_path)
    assert out["seeds"] == [0, 1]
    for key in ("0.1", "1"):
        assert out["fractions"][key]["mean"] > 0.95
        assert len(out["fractions"][key]["per_seed"]) == 2
    assert out["fractions"]["1"]["sd"] == pytest.approx(0.0, abs=1e-9)  # 100 % is the same pool for every seed
    split = json.loads((tmp_path / "splits" / "probe_seed1.json").read_text())
    assert split["seed"] == 1 and set(split["fractions"]) == {"0.1", "1"}
    assert set(split["fractions"]["0.1"]) <= set(split["fractions"]["1"])


def test_linear_probe_random_features_near_chance():
    x_tr, y_tr, ids, x_te, y_te = _probe_data(separable=False, seed=1, n_test=600)
    out = evaluate_linear_probe(x_tr, y_tr, ids, x_te, y_te, CLASSES, [1.0], 2, [0], None)
    assert abs(out["fractions"]["1"]["mean"] - 0.5) < 0.08
    assert out["split_files"] == []


def test_linear_probe_constant_features_score_exactly_chance():
    """The probe's constant-predictor check: the features of every image replaced by one vector."""
    x_tr, y_tr, ids, x_te, y_te = _probe_data(separable=True)
    real = evaluate_linear_probe(x_tr, y_tr, ids, x_te, y_te, CLASSES, [1.0], 2, [0], None)
    const = evaluate_linear_probe(np.ones_like(x_tr), y_tr, ids, np.ones_like(x_te), y_te, CLASSES, [1.0], 2, [0], None)
    assert real["fractions"]["1"]["mean"] > 0.95
    assert const["fractions"]["1"]["mean"] == pytest.approx(0.5)  # every test score ties


# ----------------------------------------------------------------------------- report


def _fake_results():
    labels = random_labels(30, 2, seed=2)
    image = F.normalize(label_vectors(labels) + 0.3 * torch.randn(30, 4), dim=1)
    zs = evaluate_zero_shot(image, lambda t: F.normalize(keyword_vectors(t), dim=1), labels, CLASSES, PROMPTS)
    zs_nan = dict(zs, per_class={"Cardiomegaly": zs["per_class"]["Cardiomegaly"], "Pleural Effusion": float("nan")},
                  undefined=["Pleural Effusion"])
    retrieval = {d: {f"R@{k}": 0.1 * k for k in (1, 5, 10)} for d in ("image_to_text", "text_to_image")}
    retrieval["label_precision"] = {d: {f"P@{k}": 0.5 for k in (1, 5, 10)} for d in ("image_to_text", "text_to_image")}
    probe = {"fractions": {"0.01": {"mean": 0.61, "sd": 0.02, "degenerate_classes": []},
                           "1": {"mean": 0.8, "sd": 0.0, "degenerate_classes": []}}}
    return {"clip-a": {"zeroshot": zs, "retrieval": retrieval, "linear_probe": probe},
            "model-b": {"zeroshot": zs_nan, "retrieval": retrieval}}


def test_report_writes_three_files_and_table(tmp_path):
    results = _fake_results()
    paths = write_report(results, tmp_path / "rep")
    assert set(paths) == {"metrics", "report", "roc"} and all(p.is_file() for p in paths.values())
    table = format_table(results)
    assert "clip-a" in table and "model-b" in table
    assert "zero-shot AUROC: Pleural Effusion" in table and "n/a" in table
    assert "0.610 ± 0.020" in table and "linear probe AUROC @1%" in table and "image→text R@5" in table
    report = paths["report"].read_text()
    assert table in report and "excluded from the mean" in report
    metrics = json.loads(paths["metrics"].read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert metrics["model-b"]["zeroshot"]["per_class"]["Pleural Effusion"] is None
    assert paths["roc"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- runner


class StubModel(nn.Module):
    """encode_image / encode_text / image_features over the stub tensors."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, images):
        return F.normalize(images + 0.01, dim=1)

    def encode_text(self, input_ids, attention_mask):
        return F.normalize(input_ids.float() + 0.01, dim=1)

    def image_features(self, images):
        return 3 * images


def stub_encode_texts(tokenizer, texts, max_length):
    ids = keyword_vectors(texts).long()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "word_ids": torch.zeros_like(ids)}


def stub_make_loader(samples, cfg, tokenizer, classes, batch_size):
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        labels = torch.tensor([s.label_vector(classes) for s in chunk])
        texts = [s.text() for s in chunk]
        enc = stub_encode_texts(tokenizer, texts, 8)
        yield Batch(images=label_vectors(labels), input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    labels=labels, ids=[s.id for s in chunk], subject_ids=[s.subject_id for s in chunk], texts=texts)


@pytest.fixture
def stub_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "_make_loader", stub_make_loader)
    monkeypatch.setattr(runner, "_encode_texts", stub_encode_texts)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(120):
        split = "test" if i < 40 else "train"
        lab = {c: int(rng.random() < 0.4) for c in CLASSES}
        words = ["cardiomegaly present." if lab["Cardiomegaly"] else "cardiomegaly absent.",
                 "effusion present." if lab["Pleural Effusion"] else "effusion absent."]
        samples.append(Sample(id=f"img{i}", subject_id=f"p{i // 2}", study_id=f"st{i}", split=split,
                              findings=" ".join(words), labels=lab))
    write_manifest(tmp_path / "data", samples, {"name": "stub", "classes": CLASSES})
    prompt_file = tmp_path / "prompts.json"
    prompt_file.write_text(json.dumps(PROMPTS))
    cfg = ExperimentConfig()
    cfg.eval.fractions, cfg.eval.probe_seeds, cfg.eval.batch_size = [0.25, 1.0], 2, 16
    return tmp_path, cfg, prompt_file


def test_runner_end_to_end_with_stubs(stub_dataset):
    tmp_path, cfg, prompt_file = stub_dataset
    model = StubModel().train()
    results = runner.evaluate_models({"stub": (model, None)}, cfg, tmp_path / "data", tmp_path / "out",
                                     pretrain_subjects={"p30", "p59"}, progress=False, prompts=prompt_file)
    res = results["stub"]
    assert res["zeroshot"]["mean"] == 1.0
    assert res["retrieval"]["image_to_text"]["R@1"] == 1.0 and res["retrieval"]["n"] == 40
    assert res["linear_probe"]["fractions"]["1"]["mean"] > 0.95
    assert res["meta"]["n_test"] == 40 and model.training  # mode restored
    for name in ("metrics.json", "report.md", "roc.png", "splits/probe_seed0.json", "splits/probe_seed1.json"):
        assert (tmp_path / "out" / name).is_file(), name


def test_runner_refuses_pretrain_subject_overlap(stub_dataset):
    tmp_path, cfg, prompt_file = stub_dataset
    with pytest.raises(EvaluationError, match=r"2 of 20 subjects.*p0, p3.*Fix"):
        runner.evaluate_models({"stub": (StubModel(), None)}, cfg, tmp_path / "data", tmp_path / "out",
                               pretrain_subjects={hash_subject(x) for x in ("p0", "p3", "p40")}, progress=False, prompts=prompt_file)
    assert not (tmp_path / "out").exists()


def test_runner_refuses_test_images_identical_to_pretraining_images(stub_dataset):
    tmp_path, cfg, prompt_file = stub_dataset
    samples = read_manifest(tmp_path / "data")
    for s in samples:
        s.meta["image_sha256"] = f"hash-{s.id}"
    write_manifest(tmp_path / "data", samples, {"name": "stub", "classes": CLASSES})
    with pytest.raises(EvaluationError, match=r"1 images of the test split 'test' are pixel-identical.*img7"):
        runner.evaluate_models({"stub": (StubModel(), None)}, cfg, tmp_path / "data", tmp_path / "out",
                               pretrain_subjects=set(), pretrain_images={"hash-img7", "hash-img90"}, progress=False,
                               prompts=prompt_file)
    # a hash seen only outside the test split is fine
    runner.evaluate_models({"stub": (StubModel(), None)}, cfg, tmp_path / "data", tmp_path / "out",
                           pretrain_subjects=set(), pretrain_images={"hash-img90"}, progress=False, prompts=prompt_file)


def test_runner_refuses_probe_split_sharing_test_subjects(stub_dataset, tmp_path):
    _, cfg, prompt_file = stub_dataset
    samples = [Sample(id=f"i{i}", subject_id=f"p{i % 3}", study_id=f"s{i}", split="test" if i < 3 else "train",
                      findings="effusion present.", labels={c: i % 2 for c in CLASSES}) for i in range(9)]
    write_manifest(tmp_path / "leaky", samples, {"name": "leaky", "classes": CLASSES})
    with pytest.raises(EvaluationError, match="linear probe's training split"):
        runner.evaluate_models({"stub": (StubModel(), None)}, cfg, tmp_path / "leaky", tmp_path / "out2",
                               pretrain_subjects=set(), progress=False, prompts=prompt_file)
    cfg.eval.probe_train_split = "test"
    with pytest.raises(EvaluationError, match="probe_train_split"):
        runner.evaluate_models({"stub": (StubModel(), None)}, cfg, tmp_path / "leaky", tmp_path / "out2",
                               pretrain_subjects=set(), progress=False, prompts=prompt_file)
