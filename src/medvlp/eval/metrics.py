"""Array-level evaluation metrics shared by every downstream task.

All functions take NumPy arrays or torch tensors and return plain Python dicts (floats,
lists), ready for ``metrics.json``. Labels use the codes of :mod:`medvlp.data.sample`
(POSITIVE=1, NEGATIVE=0, UNCERTAIN=-1, MISSING=-2).

* :func:`auroc_per_class` masks uncertain and missing entries out, per class. A class
  whose valid test entries hold only one label value has an undefined AUROC: it is
  reported as NaN, listed under ``"undefined"`` and left out of the mean.
* :func:`recall_at_k` works on an explicit (queries x candidates) relevance matrix, so a
  retrieved item counts as a hit whenever it is relevant (e.g. a text identical to the
  ground truth), not only when it is the paired item.
* :func:`label_precision_at_k` is the fraction of the top-K retrieved items whose set of
  positive labels equals the query's.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from medvlp.data.sample import NEGATIVE, POSITIVE
from medvlp.errors import EvaluationError

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)


def to_numpy(x: Any) -> np.ndarray:
    """Tensor / array-like -> NumPy array (detached, on the CPU, float32 kept as is)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _check_scores_labels(scores: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> None:
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise EvaluationError(
            f"scores {scores.shape} and labels {labels.shape} must both be (N, K) with the same shape"
        )
    if scores.shape[1] != len(classes):
        raise EvaluationError(f"scores have {scores.shape[1]} columns but {len(classes)} class names were given")


def auroc_per_class(scores: Any, labels: Any, classes: Sequence[str]) -> dict:
    """AUROC per class on the valid (positive / negative) entries, and their mean.

    Args:
        scores: (N, K) higher = more likely positive.
        labels: (N, K) label codes; uncertain and missing entries are ignored.
        classes: the K class names.

    Returns:
        ``{"per_class": {name: auroc or NaN}, "mean": float (NaN if no class is defined),
        "n_defined": int, "undefined": [names], "n_pos": {name: int}, "n_neg": {name: int}}``
    """
    scores, labels = to_numpy(scores).astype(np.float64), to_numpy(labels).astype(np.int64)
    _check_scores_labels(scores, labels, classes)
    pos, neg = labels == POSITIVE, labels == NEGATIVE
    n_pos, n_neg = pos.sum(0), neg.sum(0)
    per_class: dict[str, float] = {}
    for k, name in enumerate(classes):
        if n_pos[k] == 0 or n_neg[k] == 0:
            per_class[name] = float("nan")
            continue
        valid = pos[:, k] | neg[:, k]
        per_class[name] = float(roc_auc_score(pos[valid, k], scores[valid, k]))
    defined = [v for v in per_class.values() if not np.isnan(v)]
    return {
        "per_class": per_class,
        "mean": float(np.mean(defined)) if defined else float("nan"),
        "n_defined": len(defined),
        "undefined": [c for c, v in per_class.items() if np.isnan(v)],
        "n_pos": {c: int(n) for c, n in zip(classes, n_pos)},
        "n_neg": {c: int(n) for c, n in zip(classes, n_neg)},
    }


def roc_curves(scores: Any, labels: Any, classes: Sequence[str]) -> dict[str, dict[str, list[float]]]:
    """ROC curve points per class (uncertain / missing masked out) for plotting.

    Returns ``{name: {"fpr": [...], "tpr": [...]}}`` for every class whose AUROC is
    defined; classes with a single label value are omitted.
    """
    scores, labels = to_numpy(scores).astype(np.float64), to_numpy(labels).astype(np.int64)
    _check_scores_labels(scores, labels, classes)
    curves: dict[str, dict[str, list[float]]] = {}
    for k, name in enumerate(classes):
        valid = (labels[:, k] == POSITIVE) | (labels[:, k] == NEGATIVE)
        y = labels[valid, k] == POSITIVE
        if y.all() or not y.any():
            continue
        fpr, tpr, _ = roc_curve(y, scores[valid, k], drop_intermediate=True)
        curves[name] = {"fpr": fpr.round(6).tolist(), "tpr": tpr.round(6).tolist()}
    return curves


def top_k_indices(sim: np.ndarray, k: int) -> np.ndarray:
    """(Q, C) similarities -> (Q, min(k, C)) candidate indices, best first.

    Ties are broken by candidate index (stable sort), so results are deterministic.
    """
    k = min(k, sim.shape[1])
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def recall_at_k(sim: Any, relevant: Any, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Recall@K: fraction of queries with at least one relevant item among the top K.

    Args:
        sim: (Q, C) similarity of each query to each candidate.
        relevant: (Q, C) bool, True where the candidate is a correct answer.
        ks: the cut-offs.

    Queries with no relevant candidate at all are left out (they cannot be answered).
    Returns ``{"R@1": ..., "R@5": ..., ...}``.
    """
    sim, relevant = to_numpy(sim).astype(np.float64), to_numpy(relevant).astype(bool)
    if sim.shape != relevant.shape or sim.ndim != 2:
        raise EvaluationError(f"sim {sim.shape} and relevant {relevant.shape} must both be (Q, C)")
    answerable = relevant.any(1)
    order = top_k_indices(sim, max(ks))
    hits = np.take_along_axis(relevant, order, axis=1)  # (Q, k_max)
    # first_hit[q] = rank (0-based) of the first relevant item, k_max if none in the top k_max
    first_hit = np.where(hits.any(1), hits.argmax(1), hits.shape[1])
    n = max(int(answerable.sum()), 1)
    return {f"R@{k}": float(((first_hit < k) & answerable).sum() / n) for k in ks}


def positive_set_groups(labels: Any) -> np.ndarray:
    """(N, K) label codes -> (N,) group id; equal ids <=> equal sets of positive classes."""
    positive = to_numpy(labels) == POSITIVE
    _, inverse = np.unique(positive, axis=0, return_inverse=True)
    return inverse.reshape(-1)


def label_precision_at_k(
    sim: Any, query_labels: Any, candidate_labels: Any, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Mean over queries of the fraction of the top-K retrieved candidates whose
    positive-label set equals the query's (two samples without positives match).

    Args:
        sim: (Q, C) similarities.
        query_labels: (Q, K) label codes of the queries.
        candidate_labels: (C, K) label codes of the candidates.
    Returns ``{"P@1": ..., "P@5": ..., ...}``.
    """
    sim = to_numpy(sim).astype(np.float64)
    q_lab, c_lab = to_numpy(query_labels), to_numpy(candidate_labels)
    if sim.shape != (q_lab.shape[0], c_lab.shape[0]):
        raise EvaluationError(f"sim {sim.shape} must be (queries {q_lab.shape[0]}, candidates {c_lab.shape[0]})")
    groups = positive_set_groups(np.concatenate([q_lab, c_lab], axis=0))
    q_group, c_group = groups[: len(q_lab)], groups[len(q_lab) :]
    order = top_k_indices(sim, max(ks))
    same = c_group[order] == q_group[:, None]  # (Q, k_max)
    return {f"P@{k}": float(same[:, : min(k, same.shape[1])].mean()) for k in ks}
