"""What every encoder returns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class EncoderOutput:
    """Output of an image or text encoder.

    pooled:        (B, D) global representation ([CLS] or mean over valid tokens).
    tokens:        (B, N, D) token states: the image's patch tokens (without [CLS]; only
                   the visible ones when masking) or the text's token states (with [CLS]).
    padding_mask:  (B, N) bool, True where ``tokens`` is padding (None: no padding).
    cls_attention: (B, heads, N) last layer's attention from [CLS] to ``tokens``, on request.
    mask:          (B, L) float, 1 = masked patch, 0 = visible (MAE convention), when masking.
    ids_keep:      (B, N) indices of the visible patches among the L patches.
    ids_restore:   (B, L) indices that undo the shuffle (MAE's ``ids_restore``).
    """

    pooled: torch.Tensor
    tokens: torch.Tensor
    padding_mask: Optional[torch.Tensor] = None
    cls_attention: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    ids_keep: Optional[torch.Tensor] = None
    ids_restore: Optional[torch.Tensor] = None
