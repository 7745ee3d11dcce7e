"""Pure pieces of knowledge-guided contrastive learning (MLIP, METHODS.md section 3).

Global level, with a divergence (EMA teacher) encoder:

- :func:`multi_positive_info_nce`: InfoNCE where image i has two positives, its report w_i and
  the teacher's embedding w'_i of it, among the online and teacher texts of the batch (and
  symmetrically for texts). Per query, the loss is the mean over its positives of
  ``-log softmax`` over all 2N keys (UniCL's multi-positive form). Teacher features are
  constants (extra positives and extra negatives, no gradient).
- :func:`teacher_consistency_kl`: KL(q || p) per row, q = softmax(teacher logits) without
  gradient, p = softmax(online logits).

Token level: :func:`find_mentions` flags the report tokens that belong to a mention of a
knowledge-base entity by matching precomputed token-id sequences of the entity's names and
synonyms (:class:`PhraseTable`) on word boundaries, vectorised per phrase length.

Category level: :func:`allowed_categories` turns label codes into the prototypes a sample may
be assigned to, :func:`category_shares` gives the matching class-frequency column targets, and
:func:`restricted_sinkhorn` runs :func:`medvlp.losses.prototypes.sinkhorn` on the categories
that some sample of the global batch allows.

Shapes in each docstring; everything in fp32 with logsumexp; no per-sample Python loops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medvlp.distributed import all_reduce_sum
from medvlp.losses.prototypes import sinkhorn

POSITIVE, UNCERTAIN = 1, -1  # label codes of medvlp.data.sample (not imported: losses stay below data)


# --------------------------------------------------------------------------- global level
def _multi_positive_ce(queries: torch.Tensor, keys: torch.Tensor, teacher_keys: torch.Tensor,
                       scale: torch.Tensor | float, negative_mask: torch.Tensor | None) -> torch.Tensor:
    """One direction: query i against [keys; teacher_keys] (2N), positives i and N + i."""
    n = queries.shape[0]
    logits = scale * (queries.float() @ torch.cat([keys, teacher_keys]).float().t())  # (N, 2N)
    idx = torch.arange(n, device=logits.device)
    if negative_mask is not None:
        drop = negative_mask.bool().clone()
        drop[idx, idx] = False  # the positives themselves are never removed
        logits = logits.masked_fill(torch.cat([drop, drop], dim=1), float("-inf"))
    log_z = torch.logsumexp(logits, dim=1)
    return (log_z - 0.5 * (logits[idx, idx] + logits[idx, n + idx])).mean()


def multi_positive_info_nce(image: torch.Tensor, text: torch.Tensor, image_teacher: torch.Tensor,
                            text_teacher: torch.Tensor, logit_scale: torch.Tensor | float, *,
                            negative_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE with the teacher's embeddings as second positives.

    Args:
        image, text: (N, D) L2-normalised online embeddings, row i paired with row i.
        image_teacher, text_teacher: (N, D) L2-normalised teacher embeddings of the same
            pairs (another view); detached here.
        logit_scale: 1/tau (clamped by the caller).
        negative_mask: optional (N, N) bool, True = pair (i, k) is not a negative (identical
            reports); applied to the online and teacher columns alike, never to i == k.

    Returns:
        fp32 scalar 1/2 [L_i2t + L_t2i], L_i2t = mean_i -1/2 [log P(w_i | v_i) + log P(w'_i | v_i)]
        with P a softmax over the 2N keys {w_k} U {w'_k}. With teacher == online embeddings
        it equals CLIP's loss + log 2.
    """
    if not image.shape == text.shape == image_teacher.shape == text_teacher.shape or image.ndim != 2:
        raise ValueError(f"multi_positive_info_nce expects four (N, D) tensors, got {tuple(image.shape)}, "
                         f"{tuple(text.shape)}, {tuple(image_teacher.shape)}, {tuple(text_teacher.shape)}")
    scale = logit_scale.float() if isinstance(logit_scale, torch.Tensor) else float(logit_scale)
    mask_t = None if negative_mask is None else negative_mask.t()
    with torch.autocast(device_type=image.device.type, enabled=False):
        i2t = _multi_positive_ce(image, text, text_teacher.detach(), scale, negative_mask)
        t2i = _multi_positive_ce(text, image, image_teacher.detach(), scale, mask_t)
    return 0.5 * (i2t + t2i)


def teacher_consistency_kl(online_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """mean_i KL(q_i || p_i), q_i = softmax(teacher_logits_i) (no gradient), p_i = softmax(online_logits_i).

    (N, C) each; fp32; rows are distributions over the C columns.
    """
    if online_logits.shape != teacher_logits.shape:
        raise ValueError(f"online {tuple(online_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits differ")
    log_p = F.log_softmax(online_logits.float(), dim=1)
    log_q = F.log_softmax(teacher_logits.detach().float(), dim=1)
    return (log_q.exp() * (log_q - log_p)).sum(dim=1).mean()


# --------------------------------------------------------------------------- token level
@dataclass
class PhraseTable:
    """Token-id sequences of entity mentions, grouped by length.

    ``by_length[n]`` = (ids (P_n, n) long, entity (P_n,) long): the P_n phrases of n tokens and
    the entity (class index) each names; entity -1 marks an exclusion (a phrase that contains
    a synonym but names something else, e.g. "pericardial effusion").
    """

    by_length: dict[int, tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def build(cls, phrases: list[tuple[list[int], int]]) -> PhraseTable:
        """From (token ids, entity) pairs; duplicates are dropped (the first entity wins)."""
        seen: dict[tuple[int, ...], int] = {}
        for ids, entity in phrases:
            if ids and tuple(ids) not in seen:
                seen[tuple(ids)] = entity
        groups: dict[int, list[tuple[tuple[int, ...], int]]] = {}
        for ids, entity in seen.items():
            groups.setdefault(len(ids), []).append((ids, entity))
        return cls({n: (torch.tensor([g[0] for g in group], dtype=torch.long),
                        torch.tensor([g[1] for g in group], dtype=torch.long))
                    for n, group in sorted(groups.items())})

    def __len__(self) -> int:
        return sum(ids.shape[0] for ids, _ in self.by_length.values())


def find_mentions(input_ids: torch.Tensor, word_ids: torch.Tensor, table: PhraseTable) -> torch.Tensor:
    """(B, L) long: the entity whose mention covers each token, -1 for none.

    A phrase of n tokens matches where the n token ids are equal, every token is a real word
    token (``word_ids >= 0``), the match starts at a word start and ends at a word end (so
    "effusion" never matches inside another word). Longer phrases win over shorter ones
    where they overlap; an exclusion (entity -1) covering a token clears it. Cost: per phrase
    length n, n comparisons of the (B, W) windows against the P_n phrases and n shifts.
    """
    b, length = input_ids.shape
    device = input_ids.device
    out = torch.full((b, length), -1, dtype=torch.long, device=device)
    real = word_ids >= 0
    prev = F.pad(word_ids, (1, 0), value=-1)[:, :-1]
    nxt = F.pad(word_ids, (0, 1), value=-1)[:, 1:]
    starts = real & (word_ids != prev)
    ends = real & (word_ids != nxt)
    for n, (ids, entity) in table.by_length.items():  # a loop over phrase lengths (a handful), not samples
        if n > length:
            continue
        ids, entity = ids.to(device), entity.to(device)
        w = length - n + 1
        hit = (input_ids[:, :w, None] == ids[:, 0]) & (starts[:, :w] & ends[:, n - 1:]).unsqueeze(-1)  # (B, W, P_n)
        for j in range(1, n):
            if j == 2 and not bool(hit.any()):
                break  # most long phrases (rare words spelt in pieces) are ruled out by two tokens
            hit &= (input_ids[:, j:j + w, None] == ids[:, j]) & real[:, j:j + w, None]
        found = hit.any(-1)  # (B, W) a window starting here matches
        if not bool(found.any()):
            continue
        # distinct phrases: at most one matches a window, so the dot product reads off its entity
        which = (hit.float() @ entity.float()).round().long()
        for j in range(n):  # token s + j is covered by a match starting at s
            cov = F.pad(found, (j, length - w - j))
            out = torch.where(cov, F.pad(which, (j, length - w - j)), out)
    return out


# --------------------------------------------------------------------------- category level
def allowed_categories(labels: torch.Tensor | None, has_labels: torch.Tensor | None, n_samples: int, k: int, *,
                       no_finding: int | None, uncertain_allowed: bool = True,
                       device: torch.device | None = None) -> torch.Tensor:
    """(B, K) bool: the prototypes each sample may be assigned to.

    A labelled sample may take its positive classes (and, with ``uncertain_allowed``, the
    uncertain ones); with none of them, only ``no_finding`` (when the classes have one).
    A sample without labels (``has_labels`` False, or no labels at all) is unrestricted, and
    so is a labelled sample with nothing allowed and no "No Finding" class.
    """
    everything = torch.ones(n_samples, k, dtype=torch.bool, device=device)
    if labels is None:
        return everything
    allowed = labels == POSITIVE
    if uncertain_allowed:
        allowed |= labels == UNCERTAIN
    if no_finding is not None:
        none = ~allowed.any(dim=1)
        allowed[:, no_finding] |= none
    labelled = torch.ones(n_samples, dtype=torch.bool, device=labels.device) if has_labels is None else has_labels.bool()
    keep = labelled & allowed.any(dim=1)
    return torch.where(keep.unsqueeze(1), allowed, everything.to(labels.device))


def category_shares(allowed: torch.Tensor) -> torch.Tensor:
    """(K,) column targets that sum to 1: the global batch's class frequencies, each sample
    spreading one unit evenly over the categories it allows (so the targets are always
    feasible under ``allowed``). Summed across ranks."""
    spread = allowed.float() / allowed.float().sum(dim=1, keepdim=True).clamp(min=1)
    total = all_reduce_sum(spread.sum(dim=0))
    return total / total.sum().clamp(min=1e-12)


@torch.no_grad()
def restricted_sinkhorn(scores: torch.Tensor, allowed: torch.Tensor, *, eps: float = 0.05,
                        iters: int = 3) -> torch.Tensor:
    """(B, K) codes, zero outside ``allowed``: Sinkhorn on the categories some sample of the
    global batch allows (the others would have an empty column), with class-frequency shares."""
    shares = category_shares(allowed)
    active = shares > 0  # identical on every rank (shares are all-reduced)
    codes = torch.zeros(scores.shape, dtype=torch.float32, device=scores.device)
    sub = sinkhorn(scores[:, active], eps=eps, iters=iters, shares=shares[active] / shares[active].sum(),
                   allowed=allowed[:, active])
    codes[:, active] = sub
    return codes


__all__ = ["PhraseTable", "allowed_categories", "category_shares", "find_mentions", "multi_positive_info_nce",
           "restricted_sinkhorn", "teacher_consistency_kl"]
