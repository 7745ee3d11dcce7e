"""Cross-modal fusion encoder: co-attention layers, optionally memory-augmented (M3AE, MPMA).

Each layer updates both streams: image tokens self-attend, then cross-attend to the report
tokens; report tokens self-attend, then cross-attend to the image tokens; each stream ends
with an MLP (pre-norm residual blocks). With ``memory_slots`` > 0 the cross-attention of the
report stream to the image is memory-augmented: its keys and values are extended by learnable
memory slots (shared across samples), so the report can draw on patterns stored across the
data as well as on the current image (MPMA's memory-augmented fusion; our reconstruction).

Padding: ``text_padding`` (B, L) True at padding tokens; padded keys are masked in every
attention, and padded query rows are computed but meaningless (callers ignore them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"fusion: width {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        mask = None if key_padding is None else ~key_padding[:, None, None, :]  # True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(out.transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    """Self-attention, cross-attention, MLP; pre-norm residuals."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.n1, self.n2, self.n3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn, self.cross_attn = _Attention(dim, heads), _Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x, own_padding, context, context_padding, memory: torch.Tensor | None = None,
                first_only: bool = False):
        h = self.n1(x)
        if first_only:  # only position 0's output is wanted; keys/values still see the whole stream
            x = x[:, :1]
        x = x + self.self_attn(h[:, :1] if first_only else h, h, own_padding)
        if memory is not None:  # extend keys/values by the memory slots (never padded)
            context = torch.cat([context, memory.unsqueeze(0).expand(context.shape[0], -1, -1)], dim=1)
            if context_padding is not None:
                extra = torch.zeros(context.shape[0], memory.shape[0], dtype=torch.bool, device=context.device)
                context_padding = torch.cat([context_padding, extra], dim=1)
        x = x + self.cross_attn(self.n2(x), context, context_padding)
        return x + self.mlp(self.n3(x))


class FusionEncoder(nn.Module):
    """``forward(image_tokens (B, N, D), text_tokens (B, L, D), text_padding (B, L) | None)
    -> (fused image tokens (B, N, D), fused text tokens (B, L, D))``.

    ``first_token_only=True`` computes, in the last layer, only the first position of each
    stream (the [CLS] rows, e.g. for image-text matching): outputs are (B, 1, D), equal to
    position 0 of the full outputs, at a fraction of the last layer's cost."""

    def __init__(self, dim: int, depth: int = 2, heads: int = 4, mlp_ratio: float = 4.0, memory_slots: int = 0):
        super().__init__()
        self.image_blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.text_blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.memory = nn.Parameter(torch.randn(memory_slots, dim) * 0.02) if memory_slots > 0 else None
        self.norm_image, self.norm_text = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                text_padding: torch.Tensor | None = None, first_token_only: bool = False,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        img, txt = image_tokens, text_tokens
        last = len(self.image_blocks) - 1
        for i, (img_block, txt_block) in enumerate(zip(self.image_blocks, self.text_blocks)):
            first = first_token_only and i == last
            img, txt = (img_block(img, None, txt, text_padding, first_only=first),
                        txt_block(txt, text_padding, img, None, memory=self.memory, first_only=first))
        return self.norm_image(img), self.norm_text(txt)
