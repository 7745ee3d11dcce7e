"""The light masked-token decoder of MAE-style recipes (MAE, MRM, M3AE, MPMA, MaskedCLIP).

Input: the encoder's tokens for the *visible* patches (B, K, in_width), in the shuffled order
:func:`~medvlp.models.vit.random_masking` produced, and its ``ids_restore`` (B, N). The tokens
are projected to the decoder width, a shared learnable mask token fills every hidden position,
the sequence is put back in the original patch order, fixed 2-D sin-cos position embeddings are
added, a few transformer blocks run, and a linear head predicts ``out_dim`` values per patch:
pixels (``patch_size**2 * in_chans``) for masked image modeling, or feature vectors for
MaskedCLIP's feature decoder. No [CLS] token enters the decoder (MAE's decoder drops it too).
"""
from __future__ import annotations

import torch
from torch import nn


class MaskedTokenDecoder(nn.Module):
    """``forward(visible (B, K, in_width), ids_restore (B, N)) -> (B, N, out_dim)``."""

    def __init__(self, in_width: int, out_dim: int, grid_size: int, *, width: int = 128, depth: int = 2,
                 heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        from medvlp.models.vit import Block, sincos_pos_embed_2d

        if width % heads or depth < 1:
            raise ValueError(f"decoder width ({width}) must be divisible by heads ({heads}) and depth >= 1")
        self.embed = nn.Linear(in_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("pos", sincos_pos_embed_2d(width, grid_size)[None], persistent=False)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, 0.0) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)

    def forward(self, visible: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(visible)
        b, n = ids_restore.shape
        if x.shape[1] > n:
            raise ValueError(f"decoder: {x.shape[1]} visible tokens but only {n} patches")
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(b, n - x.shape[1], -1)], dim=1)
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # original order
        x = x + self.pos.to(x.dtype)
        for block in self.blocks:
            x, _ = block(x)
        return self.head(self.norm(x))
