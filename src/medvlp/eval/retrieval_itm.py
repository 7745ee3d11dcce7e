"""Retrieval scored by a fusion encoder's image-text matching (ITM) head (task ``retrieval_itm``).

Methods with a fusion encoder and an ITM head (M3AE, MPMA, Uni-Mlip) can score an (image, report)
pair jointly. Their papers rank retrieval candidates that way; M3AE has no shared embedding space
at all, so ITM is its only way to retrieve. Two protocols, both on the test samples that have a
report, with the identical-text rule and the tie-breaking of :mod:`medvlp.eval.retrieval`:

- **rerank** (a shared space *and* an ITM head; the ALBEF / BLIP protocol): for every query, the
  top ``eval.itm_rerank_k`` candidates by ITC similarity are re-ordered by ITM log-odds; the other
  candidates keep their ITC order below them. Same queries and candidates as the ``retrieval``
  task, so its R@K compare directly with the plain ITC numbers (reported beside them).
- **pool** (every model with an ITM head or a shared space): a fixed subset of
  ``eval.itm_pool_size`` test pairs, the same for every model (the samples whose id hashes lowest,
  :func:`pool_indices`), every image x report pair scored; R@K both ways by ITM and, for
  shared-space models, by ITC on the same pool, beside the exact chance level of a random ranking
  (:func:`chance_recall_at_k`). All-pairs ITM over the whole test set would cost N^2 fusion passes.

ITM inputs are the whole image (no patch masking) and the unmasked report, as for VQA's fused
features; the score is the head's log-odds ``logit[match] - logit[no match]``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from math import comb
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from medvlp.errors import EvaluationError
from medvlp.eval.metrics import DEFAULT_KS, recall_at_k, top_k_indices
from medvlp.eval.retrieval import text_groups


class RetrievalItmSkipped(Exception):
    """The task does not apply (no ITM head and no shared space); the message says why."""


def has_itm(model: nn.Module) -> bool:
    """Whether the model can score (image, report) pairs with an ITM head."""
    return isinstance(getattr(model, "itm_head", None), nn.Module) and callable(getattr(model, "itm_logits", None))


def has_shared_space(model: nn.Module) -> bool:
    return bool(getattr(model, "supports_text", True)) and callable(getattr(model, "encode_text", None))


def pool_indices(ids: Sequence[str], size: int) -> np.ndarray:
    """Positions of the ``size`` samples whose ids hash lowest (SHA-256), in their original order:
    a subset that depends only on the ids, so every model is scored on the same pairs."""
    keys = [hashlib.sha256(f"retrieval_itm:{i}".encode()).hexdigest() for i in ids]
    chosen = sorted(range(len(ids)), key=lambda j: keys[j])[:size]
    return np.array(sorted(chosen), dtype=np.int64)


def chance_recall_at_k(relevant: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict:
    """Expected Recall@K of a uniformly random ranking, exactly: a query with r relevant among C
    candidates misses the top K with probability C(C - r, K) / C(C, K)."""
    relevant = np.asarray(relevant, dtype=bool)
    c = relevant.shape[1]
    r = relevant.sum(1)
    out = {}
    for k in ks:
        k_eff = min(k, c)
        miss = np.array([comb(c - int(ri), k_eff) / comb(c, k_eff) for ri in r])
        out[f"R@{k}"] = float(np.mean(1.0 - miss))
    return out


def rerank_scores(sim: np.ndarray, candidates: np.ndarray, itm: np.ndarray) -> np.ndarray:
    """(Q, C) scores that rank each row's ``candidates`` first, in ITM order (equal ITM scores in
    ITC order), and every other column after them in ITC (``sim``) order.

    Args:
        sim: (Q, C) ITC similarities.
        candidates: (Q, k) column indices (the ITC top k).
        itm: (Q, k) ITM scores of those columns.
    """
    sim = np.asarray(sim, dtype=np.float64)
    itm = np.asarray(itm, dtype=np.float64)
    if candidates.shape != itm.shape or candidates.shape[0] != sim.shape[0]:
        raise EvaluationError(f"rerank: candidates {candidates.shape} and ITM scores {itm.shape} must be (Q, k) "
                              f"for the {sim.shape[0]} queries")
    out = sim.copy()
    if itm.size:
        k = itm.shape[1]
        # each row's candidates by ITM, ties (e.g. a saturated head) by ITC, then by position
        order = np.lexsort((-np.take_along_axis(sim, candidates, axis=1), -itm), axis=-1)
        ranked = np.take_along_axis(candidates, order, axis=1)
        top = sim.max() + 1.0  # every re-ranked candidate lands above every other column
        np.put_along_axis(out, ranked, top + np.arange(k, 0, -1, dtype=np.float64)[None, :], axis=1)
    return out


@dataclass
class ItmInputs:
    """The test pairs' fusion inputs, row-aligned."""

    ids: list[str]
    texts: list[str]
    image_seq: torch.Tensor            # (N, 1 + P, W)
    text_seq: torch.Tensor             # (N, L, W), zero rows past each report's length
    text_padding: torch.Tensor         # (N, L) True at padding


@torch.no_grad()
def collect_inputs(model: nn.Module, batches: Iterable, *, device) -> ItmInputs:
    """One pass over the test batches: samples without report text are dropped (no pair)."""
    ids: list[str] = []
    texts: list[str] = []
    img_seq, txt_seq, pads = [], [], []
    for batch in batches:
        keep = [i for i, t in enumerate(batch.texts) if t.strip()]
        if not keep:
            continue
        rows = torch.as_tensor(keep, dtype=torch.long)
        ids += [batch.ids[i] for i in keep]
        texts += [batch.texts[i] for i in keep]
        img_seq.append(model.fusion_image_inputs(batch.images[rows].to(device)).float().cpu())
        seq, padding = model.fusion_text_inputs(batch.input_ids[rows].to(device), batch.attention_mask[rows].to(device))
        txt_seq.append(seq.float().cpu())
        pads.append((padding if padding is not None else torch.zeros(seq.shape[:2], dtype=torch.bool)).cpu())
    if not ids:
        raise EvaluationError("retrieval_itm: the test split has no samples with report text")
    length = max(s.shape[1] for s in txt_seq)  # batches are padded to their own longest report
    text_seq = torch.cat([torch.nn.functional.pad(s, (0, 0, 0, length - s.shape[1])) for s in txt_seq])
    text_padding = torch.cat([torch.nn.functional.pad(p, (0, length - p.shape[1]), value=True) for p in pads])
    return ItmInputs(ids, texts, torch.cat(img_seq), text_seq, text_padding)


def _paired_rows(embeddings) -> tuple[list[str], list[str], torch.Tensor, torch.Tensor]:
    """The rows of the test embeddings (ids, texts, image_emb, text_emb) that have a report."""
    keep = [j for j, t in enumerate(embeddings.texts) if t.strip()]
    if not keep:
        raise EvaluationError("retrieval_itm: the test split has no samples with report text")
    rows = torch.as_tensor(keep, dtype=torch.long)
    return ([embeddings.ids[j] for j in keep], [embeddings.texts[j] for j in keep], embeddings.image_emb[rows],
            embeddings.text_emb[rows])


@torch.no_grad()
def score_pairs(model: nn.Module, inputs: ItmInputs, image_index: np.ndarray, text_index: np.ndarray, *,
                batch_size: int, device) -> np.ndarray:
    """(M,) ITM log-odds of the pairs (image_index[m], text_index[m]), in chunks of ``batch_size``."""
    image_index, text_index = np.asarray(image_index).reshape(-1), np.asarray(text_index).reshape(-1)
    out = []
    for start in range(0, len(image_index), batch_size):
        i = torch.as_tensor(image_index[start:start + batch_size])
        t = torch.as_tensor(text_index[start:start + batch_size])
        padding = inputs.text_padding[t]
        length = int((~padding).sum(1).max())  # columns past the longest report in the chunk are padding
        seq, padding = inputs.text_seq[t, :length], padding[:, :length]
        out.append(model.itm_logits(inputs.image_seq[i].to(device), seq.to(device),
                                    padding.to(device) if bool(padding.any()) else None).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def _both_ways(sim: np.ndarray, relevant: np.ndarray, ks: Sequence[int]) -> dict:
    return {"image_to_text": recall_at_k(sim, relevant, ks), "text_to_image": recall_at_k(sim.T, relevant, ks)}


def _rerank(model, inputs: ItmInputs, sim: np.ndarray, k: int, relevant: np.ndarray, ks, batch_size: int,
            device) -> dict:
    out = {"k": int(min(k, sim.shape[1])), "itc": _both_ways(sim, relevant, ks)}
    for direction, scores in (("image_to_text", sim), ("text_to_image", sim.T)):
        cand = top_k_indices(scores, k)
        queries = np.repeat(np.arange(scores.shape[0]), cand.shape[1])
        image_index, text_index = (queries, cand.reshape(-1)) if direction == "image_to_text" else (cand.reshape(-1), queries)
        itm = score_pairs(model, inputs, image_index, text_index, batch_size=batch_size, device=device)
        out[direction] = recall_at_k(rerank_scores(scores, cand, itm.reshape(cand.shape)), relevant, ks)
    return out


def evaluate_retrieval_itm(model: nn.Module, batches: Iterable, *, rerank_k: int, pool_size: int,
                           embeddings=None, batch_size: int = 512, device="cpu",
                           ks: Sequence[int] = DEFAULT_KS) -> dict:
    """ITM retrieval metrics of one model on the test batches (see the module docstring).

    ``embeddings``: the test split's ITC embeddings as the runner already has them (an object with
    ``ids``, ``texts``, ``image_emb``, ``text_emb``; rows without a report are dropped here), for
    shared-space models; None for a model without a shared space. ``batches`` are read only when
    the model has an ITM head.

    Returns ``{"rerank": {"k", "image_to_text", "text_to_image", "itc", "n"} (shared space + ITM),
    "pool": {"n", "n_unique_texts", "chance", "itm": {...}, "itc": {...}}, "scorer", "skipped_parts"}``;
    a part that does not apply is absent and its reason is under ``skipped_parts``.
    """
    itm, itc = has_itm(model), embeddings is not None
    if not itm and not itc:
        raise RetrievalItmSkipped("the model has neither an image-text matching head nor a shared image-text space")
    if rerank_k < max(ks) or pool_size < 2:
        raise EvaluationError(f"retrieval_itm: eval.itm_rerank_k ({rerank_k}) must be >= {max(ks)} (the largest "
                              f"K) and eval.itm_pool_size ({pool_size}) >= 2")
    inputs = collect_inputs(model, batches, device=device) if itm else None
    sim = None
    if itc:
        ids, texts, image_emb, text_emb = _paired_rows(embeddings)
        if inputs is not None:  # the same loader order; align by id all the same
            if sorted(ids) != sorted(inputs.ids):
                raise EvaluationError("retrieval_itm: the ITC embeddings and the ITM inputs cover different samples")
            where = {i: j for j, i in enumerate(ids)}
            order = torch.as_tensor([where[i] for i in inputs.ids], dtype=torch.long)
            image_emb, text_emb = image_emb[order], text_emb[order]
        sim = (image_emb.double() @ text_emb.double().T).numpy()
    if inputs is not None:
        ids, texts = inputs.ids, inputs.texts
    skipped = {}
    if not itm:
        skipped["itm"] = "the model has no image-text matching head (method without a fusion encoder or itm_weight 0)"
    if not itc:
        skipped["rerank"] = "the model has no shared image-text space to draw the candidates from"
        skipped["itc"] = "the model has no shared image-text space"
    out: dict = {"scorer": "ITM log-odds on the whole image and the unmasked report"}
    groups = text_groups(texts)
    if itm and itc:
        relevant = groups[:, None] == groups[None, :]
        out["rerank"] = {**_rerank(model, inputs, sim, rerank_k, relevant, ks, batch_size, device), "n": len(ids)}
    rows = pool_indices(ids, pool_size)
    g = groups[rows]
    relevant = g[:, None] == g[None, :]
    pool: dict = {"n": int(len(rows)), "n_unique_texts": int(len(np.unique(g))),
                  "chance": chance_recall_at_k(relevant, ks)}
    if itm:
        n = len(rows)
        image_index, text_index = np.repeat(rows, n), np.tile(rows, n)
        scores = score_pairs(model, inputs, image_index, text_index, batch_size=batch_size, device=device)
        pool["itm"] = _both_ways(scores.reshape(n, n), relevant, ks)
    if itc:
        pool["itc"] = _both_ways(sim[np.ix_(rows, rows)], relevant, ks)
    out["pool"] = pool
    if skipped:
        out["skipped_parts"] = skipped
    return out


__all__ = ["RetrievalItmSkipped", "chance_recall_at_k", "evaluate_retrieval_itm", "has_itm", "has_shared_space",
           "pool_indices", "rerank_scores", "score_pairs"]
