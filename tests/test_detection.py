"""Detection task: box mapping with padding, NMS, a constant-token model scoring near zero
while tokens that encode the box centres and sizes score high, and a tiny CLIP end to end."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medvlp.data.loader import make_loader
from medvlp.data.manifest import read_manifest
from medvlp.eval.detection import (
    center_targets,
    decode,
    denormalise_boxes,
    evaluate_detection,
    nms,
    normalise_boxes,
    sample_boxes,
)
from medvlp.eval.segmentation import DenseTaskSkipped
from tests.test_segmentation import _Model, _setup


def test_box_mapping_follows_the_square_padding_and_round_trips():
    # a 40 (h) x 100 (w) image is padded to 100 x 100 with 30 rows on top
    box = np.array([[10, 0, 50, 40]])
    out = normalise_boxes(box, 40, 100, pad_to_square=True)
    np.testing.assert_allclose(out, [[0.1, 0.3, 0.5, 0.7]])
    np.testing.assert_allclose(denormalise_boxes(out, 40, 100, True), box)
    # an odd padding (h 41 -> 59 rows, top 29) and no padding
    np.testing.assert_allclose(normalise_boxes([[0, 0, 100, 41]], 41, 100, True), [[0, 0.29, 1, 0.70]])
    np.testing.assert_allclose(normalise_boxes(box, 40, 100, False), [[0.1, 0, 0.5, 1]])
    np.testing.assert_allclose(denormalise_boxes(normalise_boxes(box, 40, 100, False), 40, 100, False), box)


def test_nms_keeps_the_best_of_overlapping_boxes_batched():
    boxes = torch.tensor([[[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30]],
                          [[0, 0, 10, 10], [0, 0, 10, 4], [1, 1, 11, 11]]], dtype=torch.float)
    scores = torch.tensor([[0.5, 0.9, 0.1], [0.9, 0.8, 0.7]])
    keep = nms(boxes, scores, 0.5)
    # row 0: box 1 (0.9) suppresses box 0 (IoU 0.82); row 1: box 1 has IoU 0.4 with box 0, box 2 0.68
    assert keep.tolist() == [[False, True, True], [True, True, False]]


def test_targets_and_decode_invert_each_other():
    boxes = [(np.array([[0.1, 0.1, 0.3, 0.5], [0.6, 0.6, 0.9, 0.7]]), np.array([0, 1])), (np.zeros((0, 4)), np.zeros(0, int))]
    obj, reg = center_targets(boxes, 4, 2)
    assert obj.sum() == 2 and obj[0, 1 * 4 + 0, 0] == 1 and obj[0, 2 * 4 + 3, 1] == 1
    out, scores, keep = decode(obj * 20 - 10, reg, top_k=1)
    np.testing.assert_allclose(out[0, :, 0].numpy(), boxes[0][0], atol=1e-5)
    assert keep.all() and scores[0].min() > 0.99 and scores[1].max() < 0.01


def _oracle_tokens(samples, cfg, tok, classes, scored, grid):
    """Image bytes -> (N, 5K) tokens: one-hot of the classes centred in each patch + their box terms."""
    by_id = {s.id: s for s in samples}
    table = {}
    for batch in make_loader(samples, cfg, tok, classes, batch_size=64):
        obj, reg = center_targets([sample_boxes(by_id[i], scored) for i in batch.ids], grid, len(scored))
        feats = torch.cat([obj, (reg * obj[..., None]).flatten(2)], -1)
        for img, t in zip(batch.images, feats):
            table[img.numpy().tobytes()] = t
    return table


def test_constant_tokens_score_low_and_box_tokens_score_high(tiny_dataset, tmp_path):
    cfg, classes, tok, _, test = _setup(tiny_dataset, tmp_path)
    train = read_manifest(tiny_dataset, ["train", "val", "pretrain", "pretrain-labeled", "pretrain-unpaired"])
    grid = cfg.model.vision.image_size // cfg.model.vision.patch_size
    const = _Model(lambda images: torch.ones(len(images), grid * grid, 8))
    low = evaluate_detection(const, tok, train, test, cfg, classes, fractions=(1.0,))
    assert low["grid"] == grid and low["n_test"] > 5 and "No Finding" not in low["classes"]

    table = _oracle_tokens([*train, *test], cfg, tok, classes, low["classes"], grid)
    oracle = _Model(lambda images: torch.stack([table[x.numpy().tobytes()] for x in images]))
    high = evaluate_detection(oracle, tok, train, test, cfg, classes, fractions=(0.1, 1.0))
    lo, hi = low["fractions"]["1"], high["fractions"]["1"]
    # the tiny fixture's 32 px images hold 1-2 px boxes (granulomas) seen twice in training:
    # the oracle reaches ~0.7 mAP@0.5 here, the constant model 0.0
    assert lo["map_50"] < 0.1 and hi["map_50"] > 0.6, (lo, hi)
    assert hi["map_50_95"] > lo["map_50_95"] + 0.3 and hi["map_50_95"] <= hi["map_50"]
    n = high["fractions"]
    assert n["0.1"]["n_train"][0] < n["1"]["n_train"][0] == high["n_train_pool"]


def test_skipped_without_boxes(tiny_dataset, tmp_path):
    from dataclasses import replace

    cfg, classes, tok, train, test = _setup(tiny_dataset, tmp_path)
    bare = [replace(s, meta={**s.meta, "findings": []}) for s in test]
    with pytest.raises(DenseTaskSkipped, match="needs boxes"):
        evaluate_detection(_Model(lambda x: None), tok, train, bare, cfg, classes)


def test_tiny_clip_end_to_end(tiny_dataset, tmp_path):
    from tests.test_segmentation import tiny_clip

    cfg, classes, tok, model = tiny_clip(tiny_dataset, tmp_path)
    train, test = read_manifest(tiny_dataset, ["train"]), read_manifest(tiny_dataset, ["test"])
    res = evaluate_detection(model, tok, train, test, cfg, classes, seeds=(0, 1))
    assert set(res["fractions"]) == {"0.01", "0.1", "1"} and res["grid"] == 4 and model.training
    for f in res["fractions"].values():
        assert 0.0 <= f["map_50_95"] <= f["map_50"] <= 1.0 and f["sd"] >= 0.0 and len(f["n_train"]) == 2
        assert all(0.0 <= v <= 1.0 for v in f["per_class"].values())


def test_a_class_without_training_boxes_is_not_scored(tiny_dataset, tmp_path):
    """A class boxed only in the test split cannot be learnt: it is listed as unscored instead of
    adding an AP of ~0 that depends on the test split alone."""
    from dataclasses import replace

    cfg, classes, tok, train, test = _setup(tiny_dataset, tmp_path)
    grid = cfg.model.vision.image_size // cfg.model.vision.patch_size
    const = _Model(lambda images: torch.ones(len(images), grid * grid, 8))
    full = evaluate_detection(const, tok, train, test, cfg, classes, fractions=(1.0,))
    gone = full["classes"][0]
    stripped = [replace(s, meta={**s.meta, "findings": [f for f in s.meta["findings"] if f.get("name") != gone]})
                for s in train]
    res = evaluate_detection(const, tok, stripped, test, cfg, classes, fractions=(1.0,))
    # the tiny fixture's training pool already lacks some classes' boxes: those were never scored
    assert not set(full["unscored_test_only"]) & set(full["classes"])
    assert res["unscored_test_only"] == [c for c in classes if c in {gone, *full["unscored_test_only"]}]
    assert res["classes"] == full["classes"][1:] and gone not in res["fractions"]["1"]["per_class"]
    assert set(full["fractions"]["1"]["per_class"]) <= set(full["classes"])  # classes with test boxes
