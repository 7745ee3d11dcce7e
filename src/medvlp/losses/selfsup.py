"""Uni-modal self-supervised losses: SimCLR's NT-Xent over two views.

``nt_xent(z1, z2, tau)``: the 2N embeddings (L2-normalised inside) form a (2N, 2N) cosine
matrix divided by ``tau``; each row's positive is the other view of the same sample and its
negatives are the other 2N - 2 embeddings (the row itself is removed). Mean cross-entropy over
the 2N rows, in fp32. Computed over the samples of one process (no cross-rank gather).

``pair_keys`` (N,) optional: samples with equal keys (e.g. identical report texts, for SimCSE
on reports) are not negatives of each other; those logits are removed like the diagonal.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float = 0.1, pair_keys: torch.Tensor | None = None
            ) -> torch.Tensor:
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"nt_xent: views must both be (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)
    logits = (z @ z.t() / tau).fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    if pair_keys is not None:
        keys = torch.cat([pair_keys, pair_keys])
        same = keys[:, None] == keys[None, :]
        same[torch.arange(2 * n, device=z.device), target] = False  # the positive stays
        logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, target)
