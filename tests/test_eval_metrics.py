"""Metrics, retrieval and prompts of medvlp.eval against sklearn and hand-computed cases."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from medvlp.data.sample import MISSING, NEGATIVE, POSITIVE, UNCERTAIN
from medvlp.errors import DataError, EvaluationError
from medvlp.eval.metrics import auroc_per_class, label_precision_at_k, recall_at_k, roc_curves
from medvlp.eval.prompts import DEFAULT_PROMPTS, load_prompts
from medvlp.eval.retrieval import evaluate_retrieval, text_groups


def test_auroc_matches_sklearn_when_all_labels_valid():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(50, 3))
    scores = rng.normal(size=(50, 3)) + labels
    out = auroc_per_class(torch.tensor(scores), torch.tensor(labels), ["a", "b", "c"])
    expected = [roc_auc_score(labels[:, k], scores[:, k]) for k in range(3)]
    assert [out["per_class"][c] for c in "abc"] == pytest.approx(expected)
    assert out["mean"] == pytest.approx(np.mean(expected))
    assert out["n_defined"] == 3 and out["undefined"] == []
    assert out["n_pos"]["a"] == int(labels[:, 0].sum())


def test_auroc_masks_uncertain_and_missing():
    # valid entries rank perfectly; the uncertain entry (lowest score) would be a
    # mis-ranked positive and the missing one (highest score) a mis-ranked negative
    scores = np.array([[0.9], [0.8], [0.2], [0.1], [0.05], [0.95]])
    labels = np.array([[POSITIVE], [POSITIVE], [NEGATIVE], [NEGATIVE], [UNCERTAIN], [MISSING]])
    out = auroc_per_class(scores, labels, ["x"])
    assert out["per_class"]["x"] == 1.0
    naive = roc_auc_score(labels[:, 0] != NEGATIVE, scores[:, 0])  # uncertain/missing counted as positive
    assert naive < 1.0
    assert out["n_pos"]["x"] == 2 and out["n_neg"]["x"] == 2


def test_auroc_single_value_class_is_nan_and_excluded_from_mean():
    scores = np.array([[0.9, 0.3], [0.1, 0.2], [0.5, 0.9]])
    labels = np.array([[POSITIVE, POSITIVE], [NEGATIVE, POSITIVE], [NEGATIVE, UNCERTAIN]])
    out = auroc_per_class(scores, labels, ["ok", "only_pos"])
    assert math.isnan(out["per_class"]["only_pos"])
    assert out["undefined"] == ["only_pos"]
    assert out["mean"] == out["per_class"]["ok"] == 1.0
    assert out["n_defined"] == 1


def test_auroc_all_undefined_gives_nan_mean_and_shape_errors():
    out = auroc_per_class(np.zeros((2, 1)), np.full((2, 1), MISSING), ["a"])
    assert math.isnan(out["mean"]) and out["n_defined"] == 0
    with pytest.raises(EvaluationError):
        auroc_per_class(np.zeros((2, 2)), np.zeros((2, 2)), ["a"])


def test_roc_curves_skip_undefined_and_span_unit_square():
    scores = np.array([[0.9, 0.1], [0.2, 0.4], [0.6, 0.3]])
    labels = np.array([[POSITIVE, NEGATIVE], [NEGATIVE, NEGATIVE], [POSITIVE, MISSING]])
    curves = roc_curves(scores, labels, ["a", "b"])
    assert set(curves) == {"a"}
    assert curves["a"]["fpr"][0] == 0.0 and curves["a"]["tpr"][-1] == 1.0


def test_recall_at_k_hand_example():
    sim = np.array([[0.9, 0.8, 0.1], [0.1, 0.2, 0.3], [0.5, 0.4, 0.3]])
    relevant = np.array([[False, True, False], [True, False, False], [False, False, False]])
    out = recall_at_k(sim, relevant, ks=(1, 2, 3))
    # query 0: first hit at rank 2; query 1: rank 3; query 2: unanswerable, excluded
    assert out == {"R@1": 0.0, "R@2": 0.5, "R@3": 1.0}


def test_label_precision_at_k_hand_example():
    sim = np.array([[0.9, 0.8, 0.7], [0.1, 0.9, 0.5]])
    q_labels = np.array([[POSITIVE, NEGATIVE], [NEGATIVE, MISSING]])
    c_labels = np.array([[POSITIVE, UNCERTAIN], [POSITIVE, POSITIVE], [NEGATIVE, NEGATIVE]])
    # positive sets: q0 {0}, q1 {}; c0 {0}, c1 {0,1}, c2 {}
    # q0 ranks c0 c1 c2 -> matches 1,0,0 ; q1 ranks c1 c2 c0 -> matches 0,1,0
    out = label_precision_at_k(sim, q_labels, c_labels, ks=(1, 2, 3))
    assert out["P@1"] == pytest.approx(0.5)
    assert out["P@2"] == pytest.approx((0.5 + 0.5) / 2)
    assert out["P@3"] == pytest.approx((1 / 3 + 1 / 3) / 2)


def test_text_groups_normalise_case_and_whitespace():
    groups = text_groups(["No acute  findings.", "no acute findings.", "Cardiomegaly."])
    assert groups[0] == groups[1] != groups[2]


def test_retrieval_counts_identical_texts_as_hits():
    # images 0 and 1 share a report (up to case/whitespace); image 0 is closest to text 1
    texts = ["No acute findings.", "no acute   findings.", "Cardiomegaly.", "Pleural effusion."]
    text_emb = torch.eye(4)
    image_emb = torch.nn.functional.normalize(
        torch.tensor([[0.1, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.5, 1.0], [0.0, 0.0, 0.0, 1.0]]), dim=1
    )
    labels = torch.tensor([[NEGATIVE, NEGATIVE], [NEGATIVE, NEGATIVE], [POSITIVE, NEGATIVE], [NEGATIVE, POSITIVE]])
    out = evaluate_retrieval(image_emb, text_emb, texts, labels, ks=(1, 2))
    # i->t: image 0 retrieves text 1 (identical text: a hit; with paired-only hits R@1 would be 0.5);
    # image 2 retrieves text 3 first (miss) and its own text second
    assert out["image_to_text"] == {"R@1": 0.75, "R@2": 1.0}
    # t->i: text 1 retrieves image 1 and text 0 retrieves image 0: all hits
    assert out["text_to_image"]["R@1"] == 1.0
    # image 2 (Cardiomegaly) retrieved the effusion text: only its positive set differs
    assert out["label_precision"]["image_to_text"]["P@1"] == 0.75
    assert out["n"] == 4 and out["n_unique_texts"] == 3


def test_retrieval_constant_embeddings_score_chance_paired_ones_score_one():
    """Retrieval's constant-predictor check: every image (and text) embedded to the same vector.
    With N distinct texts, ties go by candidate index, so exactly the first k queries are answered
    within the top k: R@k = k / N, the chance level of a random ranking."""
    n = 20
    texts = [f"report {i}." for i in range(n)]
    labels = torch.zeros(n, 1, dtype=torch.long)
    paired = torch.nn.functional.normalize(torch.randn(n, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    good = evaluate_retrieval(paired, paired, texts, labels, ks=(1, 5, 10))
    assert good["image_to_text"] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0} == good["text_to_image"]
    const = torch.nn.functional.normalize(torch.ones(n, 8), dim=1)
    out = evaluate_retrieval(const, const, texts, labels, ks=(1, 5, 10))
    for direction in ("image_to_text", "text_to_image"):
        assert out[direction] == pytest.approx({"R@1": 1 / n, "R@5": 5 / n, "R@10": 10 / n})


def test_retrieval_rejects_misaligned_inputs():
    with pytest.raises(EvaluationError):
        evaluate_retrieval(torch.eye(3), torch.eye(3), ["a", "b"], torch.zeros(3, 1))


def test_default_prompts_cover_chexpert_and_are_report_language():
    for name in ["No Finding", "Cardiomegaly", "Pleural Effusion", "Consolidation", "Nodule", "Pneumothorax",
                 "Atelectasis", "Edema", "Lung Opacity", "Fracture", "Support Devices"]:
        assert DEFAULT_PROMPTS[name]["positive"] and DEFAULT_PROMPTS[name]["negative"]
    assert "the heart is enlarged." in DEFAULT_PROMPTS["Cardiomegaly"]["positive"]
    assert "heart size is normal." in DEFAULT_PROMPTS["Cardiomegaly"]["negative"]


def test_load_prompts_defaults_user_file_and_errors(tmp_path):
    assert load_prompts(None, ["Edema"]) == {"Edema": DEFAULT_PROMPTS["Edema"]}
    yaml_file = tmp_path / "p.yaml"
    yaml_file.write_text("Blob:\n  positive: [a blob is seen.]\n  negative: no blob.\n")
    got = load_prompts(yaml_file, ["Blob", "Edema"])
    assert list(got) == ["Blob", "Edema"]
    assert got["Blob"] == {"positive": ["a blob is seen."], "negative": ["no blob."]}
    json_file = tmp_path / "p.json"
    json_file.write_text(json.dumps({"Edema": {"positive": ["wet lungs."], "negative": ["dry lungs."]}}))
    assert load_prompts(json_file, ["Edema"])["Edema"]["positive"] == ["wet lungs."]
    with pytest.raises(EvaluationError, match="Unknown Thing"):
        load_prompts(json_file, ["Edema", "Unknown Thing"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("Blob:\n  positive: []\n  negative: [x]\n")
    with pytest.raises(DataError, match="Blob.positive"):
        load_prompts(bad, ["Blob"])
    with pytest.raises(DataError, match="not found"):
        load_prompts(tmp_path / "nope.yaml", ["Edema"])
