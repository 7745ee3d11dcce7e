"""Linear probe at label fractions (1 / 10 / 100 %) on frozen image features.

Fraction splits (:func:`make_fraction_splits`) are *nested* (1 % is inside 10 % is
inside 100 %), *stratified* and *deterministic* given the seed:

1. A seeded permutation of the pool is drawn.
2. Each sample gets a stratum: its rarest positive class (fewest positives in the pool;
   samples without positives form one more stratum).
3. Strata are interleaved systematically: the r-th member (in permutation order) of a
   stratum of size S gets the key ``(r + u_S) / S`` with ``u_S ~ U(0, 1)`` drawn once per
   stratum; sorting by the key (ties by permutation position) gives the *stratified
   ordering*, every prefix of which holds each stratum in proportion to the pool.
4. Fraction f takes the first ``max(1, round(f * N))`` samples of the ordering, plus
   everything chosen for the next smaller fraction (nesting).
5. Top-up: for every class with at least ``min_positives`` positives in the pool, taken
   from the rarest class to the most frequent, if the selection holds fewer than
   ``min_positives`` positives of it, the earliest (in the ordering) unselected positives
   are added until it does. A fraction may therefore be slightly larger than f * N;
   classes with fewer positives in the pool than ``min_positives`` get no guarantee.

The probe (:func:`evaluate_linear_probe`) is one-vs-rest: per class, a scikit-learn
``LogisticRegression`` (L2, fixed ``C=1.0``, lbfgs; no internal CV) on features
standardised with the training fraction's mean and std, trained only on that class's
positive and negative samples (uncertain / missing ignored). Test AUROC is computed
with uncertain / missing masked out; results are mean ± sd (ddof=1) over seeds.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from medvlp.data.sample import NEGATIVE, POSITIVE
from medvlp.errors import EvaluationError, SplitFileError
from medvlp.eval.metrics import auroc_per_class, to_numpy

PROBE_C = 1.0
PROBE_MAX_ITER = 2000


def fraction_key(fraction: float) -> str:
    """Stable string key of a fraction (``0.01`` -> ``"0.01"``, ``1.0`` -> ``"1"``)."""
    return f"{fraction:g}"


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """Indices of the pool in stratified order (steps 1-3 of the module docstring)."""
    rng = np.random.default_rng(seed)
    positive = labels == POSITIVE
    n, k = positive.shape
    perm = rng.permutation(n)
    # rarest positive class of each sample; stratum k = no positive at all
    rarity = np.where(positive, positive.sum(0)[None, :], np.iinfo(np.int64).max)
    stratum = np.where(positive.any(1), rarity.argmin(1) if k else 0, k)[perm]
    by_stratum = np.argsort(stratum, kind="stable")  # permutation positions grouped by stratum
    sizes = np.bincount(stratum, minlength=k + 1)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.empty(n, dtype=np.int64)
    rank[by_stratum] = np.arange(n) - starts[stratum[by_stratum]]
    offset = rng.random(k + 1)
    key = (rank + offset[stratum]) / sizes[stratum]
    return perm[np.lexsort((np.arange(n), key))]


def fraction_indices(labels: Any, fractions: Sequence[float], min_positives: int, seed: int) -> dict[float, np.ndarray]:
    """Row indices of each fraction's subset (see the module docstring), in stratified order."""
    labels = to_numpy(labels).astype(np.int64)
    if labels.ndim != 2 or labels.shape[0] == 0:
        raise EvaluationError(f"linear probe: the training pool's labels must be a non-empty (N, K) array, got {labels.shape}")
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise EvaluationError(f"eval.fractions: each fraction must be within (0, 1], got {bad}")
    n = labels.shape[0]
    order = stratified_order(labels, seed)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    positive = labels == POSITIVE
    pool_pos = positive.sum(0)
    eligible = np.argsort(pool_pos, kind="stable")
    eligible = eligible[pool_pos[eligible] >= min_positives]  # rarest class first
    positives_in_order = positive[order]  # (N, K), rows in stratified order
    selected = np.zeros(n, dtype=bool)  # indexed by position in the ordering
    out: dict[float, np.ndarray] = {}
    for frac in sorted(set(fractions)):
        selected[: max(1, int(round(frac * n)))] = True
        for k in eligible:
            short = min_positives - int((selected & positives_in_order[:, k]).sum())
            if short > 0:
                candidates = np.flatnonzero(positives_in_order[:, k] & ~selected)[:short]
                selected[candidates] = True
        out[frac] = order[np.flatnonzero(selected)]
    return {f: out[f] for f in fractions}


def make_fraction_splits(
    ids: Sequence[str], labels: Any, fractions: Sequence[float], min_positives: int, seed: int
) -> dict[float, list[str]]:
    """Nested, stratified, deterministic label-fraction splits of a training pool.

    Args:
        ids: the N sample ids of the pool.
        labels: (N, K) label codes.
        fractions: e.g. ``[0.01, 0.1, 1.0]``.
        min_positives: positives per class guaranteed where the pool has that many.
        seed: drives the permutation and the stratum offsets.
    Returns ``{fraction: [id, ...]}`` (ids in stratified order).
    """
    ids = list(ids)
    if len(ids) != len(to_numpy(labels)):
        raise EvaluationError(f"linear probe: {len(ids)} ids but {len(to_numpy(labels))} label rows")
    return {f: [ids[i] for i in idx] for f, idx in fraction_indices(labels, fractions, min_positives, seed).items()}


def write_splits(out_dir: str | Path, seed: int, splits: dict[float, list[str]], min_positives: int) -> Path:
    """Write ``out_dir/splits/probe_seed{seed}.json`` atomically; return its path."""
    path = Path(out_dir) / "splits" / f"probe_seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "seed": seed,
        "min_positives": min_positives,
        "fractions": {fraction_key(f): ids for f, ids in splits.items()},
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def probe_split_indices(train_ids: Sequence[str], codes: np.ndarray, fractions: Sequence[float], min_positives: int,
                        seed: int, out_dir: str | Path | None) -> tuple[dict[float, np.ndarray], str | None]:
    """The linear probe's fraction indices of ``train_ids`` for ``seed``: read from its split file
    (``<out_dir>/splits/probe_seed<seed>.json``) when present, else made and written there, so
    every task on label fractions (probe, prompt tuning, fine-tuning) trains on the same samples.
    Returns (indices per fraction, the split file's path or None without ``out_dir``)."""
    path = Path(out_dir) / "splits" / f"probe_seed{seed}.json" if out_dir is not None else None
    if path is not None and path.is_file():
        payload = json.loads(path.read_text())
        saved = payload["fractions"]
        if payload.get("min_positives", min_positives) != min_positives:
            raise SplitFileError(f"{path}: made with eval.min_positives={payload['min_positives']}, this run uses "
                                  f"{min_positives}; its subsets would not be this run's. Use a fresh --out folder, "
                                  "or delete the splits folder to make new ones")
        if all(fraction_key(f) in saved for f in fractions):
            row = {sid: i for i, sid in enumerate(train_ids)}
            try:
                return {f: np.array([row[sid] for sid in saved[fraction_key(f)]], dtype=np.int64) for f in fractions}, str(path)
            except KeyError as exc:
                raise SplitFileError(f"{path}: sample {exc} is not in the probe's training split; the split file "
                                      "belongs to another dataset: use a fresh --out folder") from None
    indices = fraction_indices(codes, fractions, min_positives, seed)
    if path is None:
        return indices, None
    written = write_splits(out_dir, seed, {f: [train_ids[i] for i in idx] for f, idx in indices.items()}, min_positives)
    return indices, str(written)


def fit_probe_scores(train_x: np.ndarray, train_codes: np.ndarray, test_x: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """One-vs-rest logistic regression per class -> (test decision scores (M, K), degenerate classes).

    A class whose valid training labels hold a single value cannot be fitted: it gets a
    constant score (test AUROC 0.5) and its index is returned in the second element.
    """
    scaler = StandardScaler().fit(train_x)
    train_z, test_z = scaler.transform(train_x), scaler.transform(test_x)
    scores = np.zeros((test_x.shape[0], train_codes.shape[1]))
    degenerate: list[int] = []
    for k in range(train_codes.shape[1]):  # one model per class: the loop is over classes, not samples
        valid = (train_codes[:, k] == POSITIVE) | (train_codes[:, k] == NEGATIVE)
        y = train_codes[valid, k] == POSITIVE
        if y.all() or not y.any():
            degenerate.append(k)
            continue
        clf = LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER)
        clf.fit(train_z[valid], y)
        scores[:, k] = clf.decision_function(test_z)  # monotone in P(positive), never saturates
    return scores, degenerate


def evaluate_linear_probe(
    train_feats: Any,
    train_labels: Any,
    train_ids: Sequence[str],
    test_feats: Any,
    test_labels: Any,
    classes: Sequence[str],
    fractions: Sequence[float],
    min_positives: int,
    seeds: int | Sequence[int],
    out_dir: str | Path | None,
) -> dict:
    """Linear-probe mean AUROC per label fraction, mean ± sd over seeds.

    ``seeds`` is a count (seeds ``0..n-1``) or an explicit list. Split files are written
    to ``out_dir/splits/`` unless ``out_dir`` is None.

    Returns ``{"classifier": str, "C": float, "seeds": [...], "split_files": [...],
    "fractions": {key: {"fraction", "mean", "sd", "per_seed", "per_class", "n_train",
    "degenerate_classes"}}}`` where ``per_class`` averages each class's AUROC over seeds.
    """
    train_x, test_x = to_numpy(train_feats).astype(np.float64), to_numpy(test_feats).astype(np.float64)
    train_codes, test_codes = to_numpy(train_labels).astype(np.int64), to_numpy(test_labels).astype(np.int64)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise EvaluationError(f"linear probe: features must be (N, D) with equal D, got {train_x.shape} and {test_x.shape}")
    if train_codes.shape != (train_x.shape[0], len(classes)) or test_codes.shape != (test_x.shape[0], len(classes)):
        raise EvaluationError("linear probe: labels must be (N, K) with one row per feature row and K = len(classes)")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise EvaluationError("eval.probe_seeds: at least one seed is needed")

    per_fraction: dict[float, dict[str, list]] = {f: {"mean": [], "per_class": [], "n": [], "deg": []} for f in fractions}
    split_files: list[str] = []
    for seed in seed_list:
        indices = fraction_indices(train_codes, fractions, min_positives, seed)
        if out_dir is not None:
            splits = {f: [train_ids[i] for i in idx] for f, idx in indices.items()}
            split_files.append(str(write_splits(out_dir, seed, splits, min_positives)))
        for frac, idx in indices.items():
            scores, degenerate = fit_probe_scores(train_x[idx], train_codes[idx], test_x)
            auroc = auroc_per_class(scores, test_codes, classes)
            acc = per_fraction[frac]
            acc["mean"].append(auroc["mean"])
            acc["per_class"].append([auroc["per_class"][c] for c in classes])
            acc["n"].append(int(len(idx)))
            acc["deg"].append([classes[k] for k in degenerate])

    fractions_out = {}
    for frac, acc in per_fraction.items():
        means = np.asarray(acc["mean"], dtype=np.float64)
        with warnings.catch_warnings():  # a class undefined on the test set stays NaN, silently
            warnings.simplefilter("ignore", RuntimeWarning)
            per_class = np.nanmean(np.asarray(acc["per_class"], dtype=np.float64), axis=0) if acc["per_class"] else []
        fractions_out[fraction_key(frac)] = {
            "fraction": float(frac),
            "mean": float(np.mean(means)),
            "sd": float(np.std(means, ddof=1)) if len(means) > 1 else 0.0,
            "per_seed": means.tolist(),
            "per_class": {c: float(v) for c, v in zip(classes, per_class)},
            "n_train": acc["n"],
            "degenerate_classes": sorted({c for seed_deg in acc["deg"] for c in seed_deg}),
        }
    return {
        "classifier": f"one-vs-rest LogisticRegression(C={PROBE_C}, lbfgs) on standardised features",
        "C": PROBE_C,
        "seeds": seed_list,
        "min_positives": int(min_positives),
        "split_files": split_files,
        "fractions": fractions_out,
    }
