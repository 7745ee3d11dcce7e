"""Dense-prediction metrics: Dice per class, box IoU, average precision and mAP.

Conventions (the evaluation docs repeat them, docs/evaluation_dense.md):

- **Dice** of one (image, class) pair is ``2 |P ∩ G| / (|P| + |G|)``. A pair where both the
  prediction and the ground truth are empty is *undefined* and left out (NaN), not counted
  as 1: a class's Dice is the mean over the images where it is present in the ground truth
  or in the prediction, so false positives on images without the finding lower it, while the
  (easy) empty-empty majority does not inflate it.
- **Boxes** are ``[x0, y0, x1, y1]`` with ``x1 >= x0``, ``y1 >= y0`` in any one frame (IoU is
  invariant to a common translation and scale); the area is ``(x1 - x0) * (y1 - y0)``.
- **AP** at one IoU threshold: detections of a class are sorted by score (descending, stable),
  each is matched greedily to the unmatched ground-truth box of its image with the highest IoU
  when that IoU is at least the threshold (true positive), else it is a false positive; a
  second detection of an already matched box is a false positive. AP is the area under the
  precision-recall curve with *all-point interpolation* (VOC 2010+: precision replaced by its
  running maximum from the right). ``interpolate=False`` gives the plain step sum
  ``sum (R_n - R_{n-1}) P_n``, which is scikit-learn's ``average_precision_score`` when every
  ground-truth box is detected and scores are distinct; the interpolated AP is never lower.
  COCO samples the same interpolated curve at 101 recall points instead, which can differ
  slightly (not used here).
- **mAP** averages AP over the classes that have at least one ground-truth box;
  ``map_50`` at IoU 0.5 and ``map_50_95`` over the 10 thresholds 0.50, 0.55, ..., 0.95.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

IOU_THRESHOLDS = tuple(np.round(np.arange(0.5, 0.951, 0.05), 2).tolist())


# ------------------------------------------------------------------------------------ Dice
def dice_stats(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, K, H, W) bool predictions and ground truth -> (intersection, |P|, |G|), each (B, K).

    Accumulate these over batches and call :func:`dice_from_stats` once."""
    if pred.shape != gt.shape:
        raise ValueError(f"dice: prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in shape")
    pred, gt = pred.bool().flatten(2), gt.bool().flatten(2)
    return (pred & gt).sum(-1), pred.sum(-1), gt.sum(-1)


def dice_from_stats(inter: torch.Tensor, psum: torch.Tensor, gsum: torch.Tensor) -> torch.Tensor:
    """(N, K) Dice per pair; NaN where prediction and ground truth are both empty."""
    denom = (psum + gsum).double()
    return torch.where(denom > 0, 2 * inter.double() / denom.clamp(min=1), torch.full_like(denom, float("nan")))


def dice_per_class(dice: torch.Tensor, classes: Sequence[str]) -> dict:
    """(N, K) pair Dice -> ``{"per_class": {class: mean over defined pairs}, "mean", "n_images"}``.

    Classes with no defined pair (absent from every ground truth and prediction) are left out."""
    defined = ~torch.isnan(dice)
    per_class, counts = {}, {}
    for k, name in enumerate(classes):
        if bool(defined[:, k].any()):
            per_class[name] = float(dice[defined[:, k], k].mean())
            counts[name] = int(defined[:, k].sum())
    mean = float(np.mean(list(per_class.values()))) if per_class else None
    return {"per_class": per_class, "mean": mean, "n_images": counts}


# ------------------------------------------------------------------------------------ boxes
def box_iou(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """(N, 4) and (M, 4) boxes -> (N, M) IoU (0 where the union is empty)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def match_detections(det_boxes, det_scores, det_images, gt_boxes, gt_images, iou_threshold: float) -> np.ndarray:
    """Greedy matching of one class's detections (see the module docstring) -> (D,) bool true positives.

    ``det_images`` / ``gt_images`` are integer image ids; boxes only match within an image.
    The returned flags follow the input order of the detections.
    """
    det_scores = np.asarray(det_scores, dtype=np.float64)
    det_images, gt_images = np.asarray(det_images), np.asarray(gt_images)
    tp = np.zeros(len(det_scores), dtype=bool)
    if len(det_scores) == 0 or len(gt_images) == 0:
        return tp
    iou = box_iou(det_boxes, gt_boxes)
    iou[det_images[:, None] != gt_images[None, :]] = -1.0  # other images never match
    taken = np.zeros(len(gt_images), dtype=bool)
    # the loop is over detections in score order: greedy matching is sequential by definition
    for d in np.argsort(-det_scores, kind="stable"):
        row = np.where(taken, -1.0, iou[d])
        g = int(row.argmax())
        if row[g] >= iou_threshold:
            tp[d], taken[g] = True, True
    return tp


def average_precision(scores, true_positive, n_gt: int, interpolate: bool = True) -> float:
    """AP of one class from its detections' scores and true-positive flags (module docstring).

    Returns NaN when ``n_gt`` is 0 (undefined), 0.0 when there are ground truths but no detection."""
    if n_gt <= 0:
        return float("nan")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    tp = np.asarray(true_positive, dtype=bool)[order]
    ctp = np.cumsum(tp)
    precision = ctp / np.arange(1, len(tp) + 1)
    recall = ctp / n_gt
    if interpolate:
        precision = np.maximum.accumulate(precision[::-1])[::-1]
    gain = np.diff(np.concatenate([[0.0], recall]))
    return float((gain * precision).sum())


def mean_average_precision(detections: dict, ground_truth: dict, classes: Sequence[str],
                           iou_thresholds: Sequence[float] = IOU_THRESHOLDS) -> dict:
    """mAP@0.5 and mAP@[0.5:0.95] over the classes that have ground truth.

    Args:
        detections: ``{class: (boxes (D, 4), scores (D,), image ids (D,))}``.
        ground_truth: ``{class: (boxes (G, 4), image ids (G,))}``.
        classes: the classes to score (a class without ground truth is listed in ``no_gt``).
        iou_thresholds: must contain 0.5 for ``map_50``.
    Returns ``{"map_50", "map_50_95", "ap_50": {class: AP}, "ap_50_95": {class: AP}, "n_gt": {class: G},
    "no_gt": [classes]}``.
    """
    thresholds = [float(t) for t in iou_thresholds]
    ap50, ap5095, n_gt, no_gt = {}, {}, {}, []
    for name in classes:
        g_boxes, g_images = ground_truth.get(name, (np.zeros((0, 4)), np.zeros(0, dtype=np.int64)))
        if len(g_images) == 0:
            no_gt.append(name)
            continue
        d_boxes, d_scores, d_images = detections.get(name, (np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64)))
        aps = [average_precision(d_scores, match_detections(d_boxes, d_scores, d_images, g_boxes, g_images, t),
                                 len(g_images)) for t in thresholds]
        n_gt[name] = len(g_images)
        if 0.5 in thresholds:
            ap50[name] = aps[thresholds.index(0.5)]
        ap5095[name] = float(np.mean(aps))
    return {
        "map_50": float(np.mean(list(ap50.values()))) if ap50 else None,
        "map_50_95": float(np.mean(list(ap5095.values()))) if ap5095 else None,
        "ap_50": ap50, "ap_50_95": ap5095, "n_gt": n_gt, "no_gt": no_gt,
        "iou_thresholds": thresholds,
    }


__all__ = [
    "IOU_THRESHOLDS",
    "average_precision",
    "box_iou",
    "dice_from_stats",
    "dice_per_class",
    "dice_stats",
    "match_detections",
    "mean_average_precision",
]
