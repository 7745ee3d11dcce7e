"""Token-patch local alignment, the two variants of METHODS.md (GLoRIA and MGCA).

Shapes: ``words`` (B, L, D) report token embeddings with ``word_mask`` (B, L) (True = a real
word token, False = special/padding), ``patches`` (B, N, D) image patch embeddings. Both are
L2-normalised inside. Everything is vectorised over the batch; sums of exponentials go through
logsumexp; the losses are computed in fp32.

- :func:`gloria_local_loss` (across the pairs of a batch): for every image i and report k,
  each word of k attends to the patches of i (softmax of ``sharpen`` x cosine), the word is
  scored against its attended context by cosine, the word scores are aggregated into one
  pair score ``S(i, k) = 1/agg * log sum_j exp(agg * s_j)`` (``agg`` = 5), and an InfoNCE over
  pairs with ``scale`` (10) is taken in both directions.
- :func:`mgca_local_loss` (within each pair): each word attends to its own image's patches
  and the word must pick its own patch context among the contexts of the other words of the
  same report (token-level InfoNCE, ``tau`` 0.1), weighted by token importance (e.g. the text
  encoder's last-layer [CLS] attention); likewise each patch against the word contexts,
  weighted by the image's [CLS] attention. Uniform importance when none is given.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def gloria_pair_scores(words: torch.Tensor, word_mask: torch.Tensor, patches: torch.Tensor, *,
                       sharpen: float = 4.0, agg: float = 5.0) -> torch.Tensor:
    """(B_img, B_txt) scores S(i, k) of image i against report k (GLoRIA's local similarity).

    The attended context c = sum_n a_n p_n of a word w is never materialised (that would be an
    (I, T, L, D) tensor): with unit p and w, c . w = sum_n a_n cos_n and
    |c|^2 = a^T G a with the image's patch Gram matrix G = P P^T, so the cosine of the context
    with its word comes from (I, T, L, N) tensors and an (I, N, N) Gram matrix only. Columns
    after a batch's last real word are dropped first (padding never scores)."""
    real = word_mask.bool()
    last = int(real.any(dim=0).nonzero().max()) + 1 if bool(real.any()) else 1
    words, real = words[:, :last], real[:, :last]
    w, p = _normalise(words), _normalise(patches)  # (T, L, D), (I, N, D)
    cos = torch.einsum("tld,ind->itln", w, p)  # (I, T, L, N) word-patch cosine
    attn = torch.softmax(sharpen * cos, dim=-1)
    dot = (attn * cos).sum(-1)  # c . w
    gram = torch.einsum("ind,imd->inm", p, p)  # (I, N, N)
    sq_norm = (torch.einsum("itln,inm->itlm", attn, gram) * attn).sum(-1)  # |c|^2
    s = dot / sq_norm.clamp(min=1e-24).sqrt()  # F.normalize's eps: |c| floored at 1e-12
    s = (agg * s).masked_fill(~real.unsqueeze(0), float("-inf"))
    return torch.logsumexp(s, dim=-1) / agg


def gloria_local_loss(words: torch.Tensor, word_mask: torch.Tensor, patches: torch.Tensor, *,
                      sharpen: float = 4.0, agg: float = 5.0, scale: float = 10.0) -> torch.Tensor:
    """Symmetric InfoNCE over the pairs of a batch on GLoRIA's local pair scores."""
    scores = scale * gloria_pair_scores(words, word_mask, patches, sharpen=sharpen, agg=agg)
    target = torch.arange(scores.shape[0], device=scores.device)
    return 0.5 * (F.cross_entropy(scores, target) + F.cross_entropy(scores.t(), target))


def _token_infonce(queries: torch.Tensor, q_mask: torch.Tensor, keys: torch.Tensor, k_mask: torch.Tensor,
                   weight: torch.Tensor, tau: float) -> torch.Tensor:
    """Within-pair token InfoNCE: query j of pair b attends to the keys of pair b; its context
    must match query j among the contexts of all queries of the same pair."""
    attn_logits = torch.einsum("bqd,bkd->bqk", queries, keys) / queries.shape[-1] ** 0.5
    attn = torch.softmax(attn_logits.masked_fill(~k_mask.unsqueeze(1), float("-inf")), dim=-1)
    context = _normalise(torch.einsum("bqk,bkd->bqd", attn, keys))  # (B, Q, D)
    logits = torch.einsum("bqd,brd->bqr", queries, context) / tau  # query q vs context of query r
    logits = logits.masked_fill(~q_mask.unsqueeze(1), float("-inf"))
    idx = torch.arange(queries.shape[1], device=queries.device)
    log_p = logits[:, idx, idx] - torch.logsumexp(logits, dim=-1)  # (B, Q)
    weight = weight.float() * q_mask
    weight = weight / weight.sum(dim=1, keepdim=True).clamp(min=1e-12)
    per_pair = -(weight * log_p.masked_fill(~q_mask, 0.0)).sum(dim=1)
    return per_pair.mean()


def mgca_local_loss(words: torch.Tensor, word_mask: torch.Tensor, patches: torch.Tensor, *,
                    word_importance: torch.Tensor | None = None, patch_importance: torch.Tensor | None = None,
                    tau: float = 0.1) -> torch.Tensor:
    """MGCA's token-level alignment within each pair: mean of the word->patch and the
    patch->word terms. Importances are (B, L) / (B, N), non-negative; uniform when None."""
    w, p = _normalise(words), _normalise(patches)
    wm = word_mask.bool()
    pm = torch.ones(p.shape[:2], dtype=torch.bool, device=p.device)
    wi = torch.ones_like(wm, dtype=torch.float32) if word_importance is None else word_importance
    pi = torch.ones(p.shape[:2], device=p.device) if patch_importance is None else patch_importance
    return 0.5 * (_token_infonce(w, wm, p, pm, wi, tau) + _token_infonce(p, pm, w, wm, pi, tau))
