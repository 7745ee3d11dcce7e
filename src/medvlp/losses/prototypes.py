"""Prototype assignment by Sinkhorn-Knopp, and the swapped-prediction loss (SwAV, MGCA, MLIP).

:func:`sinkhorn` turns (B, K) sample-prototype scores into soft codes: every sample spreads one
unit of mass over the prototypes (rows sum to 1) and prototype k receives ``share_k`` of the
*global* batch (columns sum to ``B_global * share_k``; equal shares by default, class
frequencies where labels restrict assignments). It runs without gradient, in fp32 and in the
log domain (``scores / eps`` can be large under a small ``eps``), and the column sums are
reduced across ranks, so the codes of a distributed batch equal those of one process seeing the
whole batch. ``allowed`` (B, K) limits each sample to some prototypes (e.g. the categories its
labels allow); the shares must then be feasible.

K should be at most the global batch (or a feature queue should provide more rows): with
K = 500 and 64 samples the equal-share constraint makes codes near uniform.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from medvlp.distributed import all_reduce_max, all_reduce_sum


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, *, eps: float = 0.05, iters: int = 3, shares: torch.Tensor | None = None,
             allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Soft codes (B, K) for this rank's rows of the global batch (see the module docstring)."""
    log_q = scores.detach().float() / eps
    if allowed is not None:
        log_q = log_q.masked_fill(~allowed.bool(), float("-inf"))
    k = log_q.shape[1]
    total = all_reduce_sum(torch.tensor(float(log_q.shape[0]), device=log_q.device))
    target = torch.full((k,), 1.0 / k, device=log_q.device) if shares is None else shares.float().to(log_q.device)
    log_col_target = torch.log(target * total)
    for _ in range(iters):
        # columns: log of the global column sums, stably (max, then sum of exponentials)
        m = all_reduce_max(log_q.max(dim=0).values.clone())
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        col = all_reduce_sum(torch.exp(log_q - m).sum(dim=0))
        log_q = log_q + (log_col_target - (m + torch.log(col)))
        # rows: each sample carries one unit
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)
    return log_q.exp()


def swapped_prediction_loss(image_logits: torch.Tensor, text_logits: torch.Tensor, image_codes: torch.Tensor,
                            text_codes: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """Each modality predicts the other's codes: 1/2 [H(q_t, p_i) + H(q_i, p_t)] with
    p = softmax(logits / temperature); (B, K) each, codes without gradient."""
    log_pi = F.log_softmax(image_logits.float() / temperature, dim=1)
    log_pt = F.log_softmax(text_logits.float() / temperature, dim=1)
    return -0.5 * ((text_codes.detach() * log_pi).sum(1).mean() + (image_codes.detach() * log_pt).sum(1).mean())
