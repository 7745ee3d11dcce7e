"""Feature distillation losses: a student's predicted token features against a teacher's.

:func:`masked_feature_distill` is MaskedCLIP's masked knowledge distillation (L_MKD): the
feature decoder predicts, from the masked view, a feature vector at every patch position;
the target is the teacher's feature at the same position, computed from the unmasked image.
Only the positions hidden from the student count (the visible ones are nearly free to copy).
Both vectors are L2-normalised first, so only the direction is matched, as in the CLIP space
the target lives in.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

DistillKind = Literal["cosine", "smooth_l1"]


def masked_feature_distill(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *,
                           kind: DistillKind = "cosine", beta: float = 0.1) -> torch.Tensor:
    """Mean over masked positions of a distance between normalised pred and target features.

    Args:
        pred: (B, N, D) student predictions, one feature vector per patch position.
        target: (B, N, D) teacher features at the same positions; no gradient reaches it.
        mask: (B, N) 1 where the position was hidden from the student, 0 where visible.
        kind: ``cosine``: 1 - cos(pred, target) per position; ``smooth_l1``: the smooth-L1
            distance (``beta``: where it turns from quadratic to linear) between the
            L2-normalised vectors, summed over the D channels (summed, not averaged, so its
            size does not shrink with D; for channel differences below ``beta`` it equals
            (1 - cos) / beta).
        beta: the smooth-L1 threshold (> 0); unused by ``cosine``.
    Returns the fp32 scalar mean over masked positions; zero (with a gradient path) when
    nothing is masked.
    """
    if pred.shape != target.shape or mask.shape != pred.shape[:2]:
        raise ValueError(f"masked_feature_distill: pred {tuple(pred.shape)}, target {tuple(target.shape)}, "
                         f"mask {tuple(mask.shape)}: expected (B, N, D), (B, N, D), (B, N)")
    p = F.normalize(pred.float(), dim=-1)
    t = F.normalize(target.detach().float(), dim=-1)
    if kind == "cosine":
        per_pos = 1.0 - (p * t).sum(dim=-1)
    elif kind == "smooth_l1":
        if not beta > 0:
            raise ValueError(f"masked_feature_distill: beta must be > 0, got {beta}")
        per_pos = F.smooth_l1_loss(p, t, reduction="none", beta=beta).sum(dim=-1)
    else:
        raise ValueError(f"masked_feature_distill: unknown kind {kind!r}; use 'cosine' or 'smooth_l1'")
    mask = mask.to(per_pos.dtype)
    return (per_pos * mask).sum() / mask.sum().clamp(min=1.0)
