"""Dense metrics against hand-computed cases and scikit-learn: Dice with the empty-empty
convention, box IoU, greedy matching, AP (interpolated and not) and mAP over IoU thresholds."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from medvlp.eval.dense_metrics import (
    IOU_THRESHOLDS,
    average_precision,
    box_iou,
    dice_from_stats,
    dice_per_class,
    dice_stats,
    match_detections,
    mean_average_precision,
)


def test_dice_by_hand_and_empty_empty_is_left_out():
    gt = torch.zeros(3, 2, 2, 2, dtype=torch.bool)
    pred = torch.zeros_like(gt)
    gt[0, 0, 0, :] = True           # image 0, class 0: G = 2 px
    pred[0, 0, 0, 0] = True         # P = 1 px inside -> 2 * 1 / 3
    pred[1, 0, 1, 1] = True         # image 1, class 0: false positive on an empty truth -> 0
    gt[2, 1] = True                 # image 2, class 1: perfect -> 1; class 1 elsewhere empty-empty
    pred[2, 1] = True
    dice = dice_from_stats(*dice_stats(pred, gt))
    assert dice[0, 0].item() == pytest.approx(2 / 3) and dice[1, 0].item() == 0.0 and dice[2, 1].item() == 1.0
    assert math.isnan(dice[2, 0].item()) and math.isnan(dice[0, 1].item())
    out = dice_per_class(dice, ["a", "b"])
    assert out["per_class"] == pytest.approx({"a": (2 / 3 + 0) / 2, "b": 1.0})
    assert out["n_images"] == {"a": 2, "b": 1}
    assert out["mean"] == pytest.approx(((2 / 3) / 2 + 1) / 2)
    assert dice_per_class(torch.full((2, 1), float("nan")), ["c"]) == {"per_class": {}, "mean": None, "n_images": {}}


def test_box_iou_by_hand():
    a = np.array([[0, 0, 2, 2], [0, 0, 1, 1]])
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6], [0, 0, 0, 0]])
    expected = np.array([[1 / 7, 1.0, 0.0, 0.0], [0.0, 0.25, 0.0, 0.0]])
    np.testing.assert_allclose(box_iou(a, b), expected)
    np.testing.assert_allclose(box_iou(torch.tensor(b[:1], dtype=torch.float32), a), [[1 / 7, 0.0]])


def test_greedy_matching_by_score_and_duplicates_are_false_positives():
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]])
    det = np.array([[0, 0, 10, 10], [1, 0, 10, 10], [20, 20, 30, 31], [20, 20, 30, 30]])
    scores = np.array([0.5, 0.9, 0.3, 0.8])
    images = np.array([0, 0, 0, 1])  # the last detection is in another image than the second truth
    tp = match_detections(det, scores, images, gt, np.array([0, 0]), 0.5)
    # 0.9 (IoU 0.9) takes truth 0, so the exact 0.5 box is a duplicate; 0.8 is in image 1
    assert tp.tolist() == [False, True, True, False]
    # at 0.95 the 0.9 box (IoU 0.9) misses, leaving truth 0 to the exact box; IoU 10/11 misses too
    assert match_detections(det, scores, images, gt, np.array([0, 0]), 0.95).tolist() == [True, False, False, False]


def test_ap_by_hand_interpolated_and_step():
    # ranked: TP, FP, TP, of 3 truths: P = 1, 1/2, 2/3 at R = 1/3, 1/3, 2/3
    scores, tp = [0.9, 0.8, 0.7], [True, False, True]
    assert average_precision(scores, tp, 3, interpolate=False) == pytest.approx(1 / 3 * 1 + 1 / 3 * 2 / 3)
    assert average_precision(scores, tp, 3) == pytest.approx(1 / 3 + 1 / 3 * 2 / 3)
    # ranked FP, TP: step 1/2, interpolated the same (precision rises later only when TPs follow FPs)
    assert average_precision([0.9, 0.1], [False, True], 1) == pytest.approx(0.5)
    # TP, FP, FP, TP of 2: step = 1/2 * 1 + 1/2 * 1/2; interpolation does not change a falling tail
    assert average_precision([4, 3, 2, 1], [True, False, False, True], 2) == pytest.approx(0.75)
    # FP, TP, TP of 2: P = 0, 1/2, 2/3; interpolated lifts the first TP's precision to 2/3
    assert average_precision([3, 2, 1], [False, True, True], 2, interpolate=False) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert average_precision([3, 2, 1], [False, True, True], 2) == pytest.approx(2 / 3)
    assert math.isnan(average_precision([0.5], [False], 0)) and average_precision([], [], 2) == 0.0


def test_ap_matches_sklearn_when_matching_is_trivial():
    rng = np.random.default_rng(0)
    n = 200
    present = rng.random(n) < 0.4  # one truth box per image where present
    scores = rng.random(n) + present * rng.random(n)  # distinct, informative scores
    gt_box = np.array([10, 10, 30, 30])
    # one detection per image: exactly on the truth (IoU 1) where present, elsewhere nothing to hit
    det_boxes = np.tile(gt_box, (n, 1))
    tp = match_detections(det_boxes, scores, np.arange(n), np.tile(gt_box, (int(present.sum()), 1)),
                          np.flatnonzero(present), 0.5)
    assert (tp == present).all()
    ref = average_precision_score(present, scores)
    assert average_precision(scores, tp, int(present.sum()), interpolate=False) == pytest.approx(ref, abs=1e-12)
    assert average_precision(scores, tp, int(present.sum())) >= ref - 1e-12


def test_map_over_thresholds_by_hand():
    assert IOU_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
    gt = {"a": (np.array([[0, 0, 10, 10]]), np.array([0])), "b": (np.array([[0, 0, 10, 10]]), np.array([1]))}
    # class a: IoU 0.8 -> TP at thresholds 0.5 ... 0.8 (7 of 10); class b: detected in the wrong image
    det = {"a": (np.array([[0, 0, 10, 8]]), np.array([0.9]), np.array([0])),
           "b": (np.array([[0, 0, 10, 10]]), np.array([0.9]), np.array([0]))}
    out = mean_average_precision(det, gt, ["a", "b", "c"])
    assert out["ap_50"] == {"a": 1.0, "b": 0.0} and out["no_gt"] == ["c"]
    assert out["ap_50_95"]["a"] == pytest.approx(0.7)
    assert out["map_50"] == pytest.approx(0.5) and out["map_50_95"] == pytest.approx(0.35)
    assert mean_average_precision({}, gt, ["a"])["map_50"] == 0.0
