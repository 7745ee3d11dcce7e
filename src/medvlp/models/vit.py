"""Vision Transformer image encoder with MAE-style random masking.

A plain pre-norm ViT (conv patch embedding, learnable [CLS] token, fixed 2-D sin-cos
position embedding, transformer blocks, final LayerNorm). ``forward`` optionally drops
a random subset of patches exactly as MAE does (argsort of per-sample noise; position
embeddings are added *before* masking) and returns what a decoder needs to put the
visible tokens back in place (``ids_keep``, ``ids_restore``, ``mask``). On request the
last block also returns the [CLS] -> patch attention used for token importance.

The position embedding is the fixed sin-cos table of MAE (a non-persistent buffer,
rebuilt from the config), so it never trains and never needs to be stored.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from medvlp.config import VisionConfig
from medvlp.errors import ConfigError
from medvlp.models.output import EncoderOutput


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, (grid_size**2, dim), row-major patch order.

    Half of the channels encode the row, half the column (MAE / MoCo v3 convention).
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, prob: float = 0.0):
        super().__init__()
        self.prob = prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"prob={self.prob}"


class Attention(nn.Module):
    """Multi-head self-attention; SDPA by default, explicit softmax when the map is needed."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, d)
        probs = None
        if return_attention:
            probs = (q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)).softmax(dim=-1)
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, length, dim)
        return self.proj(out), probs


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, probs = self.attn(self.norm1(x), return_attention)
        x = x + self.drop_path(attn_out)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, probs


def random_masking(
    x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE per-sample random masking.

    x: (B, L, D). Patches are ranked by ``noise`` (B, L) (uniform if None); the lowest
    ``round(L * (1 - mask_ratio))`` are kept. Returns (x_visible (B, K, D), mask (B, L)
    with 1 = masked in the original patch order, ids_keep (B, K), ids_restore (B, L)).
    """
    batch, length, dim = x.shape
    keep = max(1, int(round(length * (1.0 - mask_ratio))))
    if noise is None:
        noise = torch.rand(batch, length, device=x.device)
    elif noise.shape != (batch, length):
        raise ValueError(f"noise must have shape {(batch, length)}, got {tuple(noise.shape)}")
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :keep]
    visible = x.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(batch, length, device=x.device, dtype=x.dtype)
    mask[:, :keep] = 0
    mask = mask.gather(1, ids_restore)
    return visible, mask, ids_keep, ids_restore


class VisionTransformer(nn.Module):
    """ViT image encoder (pre-norm, [CLS] pooling, fixed 2-D sin-cos positions, MAE masking)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ConfigError(
                f"model.vision.image_size ({cfg.image_size}) must be a multiple of "
                f"model.vision.patch_size ({cfg.patch_size})"
            )
        if cfg.width % cfg.heads or cfg.width % 4:
            raise ConfigError(
                f"model.vision.width ({cfg.width}) must be divisible by model.vision.heads ({cfg.heads}) "
                "and by 4 (sin-cos position embedding)"
            )
        self.cfg = cfg
        self.width = cfg.width
        self.patch_size = cfg.patch_size
        self.in_chans = cfg.in_chans
        self.image_size = cfg.image_size
        self.grid_size = cfg.image_size // cfg.patch_size
        self.num_patches = self.grid_size**2
        self.grad_checkpointing = cfg.grad_checkpointing

        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(cfg.width, self.grid_size)[None], persistent=False)
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAE initialisation: Xavier-uniform for every linear and for the patch
        embedding (viewed as a linear over flattened patches), zero biases, unit LN,
        N(0, 0.02) [CLS]. Xavier (rather than timm's N(0, 0.02)) keeps the image content
        of each token as strong as the fixed position embedding; with N(0, 0.02) the
        positions dominate and small-data contrastive training collapses."""
        nn.init.normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        weight = self.patch_embed.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that optimisers should exclude from weight decay."""
        return {"cls_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    # ------------------------------------------------------------------ patches

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p*p*C), row-major patches, each flattened as (p, p, C)."""
        p, g = self.patch_size, self.grid_size
        batch, chans = images.shape[:2]
        x = images.reshape(batch, chans, g, p, g, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, g * g, p * p * chans)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C) -> (B, C, H, W); the inverse of :meth:`patchify`."""
        p, g = self.patch_size, self.grid_size
        batch = patches.shape[0]
        chans = patches.shape[-1] // (p * p)
        x = patches.reshape(batch, g, g, p, p, chans)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, chans, g * p, g * p)

    # ------------------------------------------------------------------ forward

    def _check_images(self, images: torch.Tensor) -> None:
        expected = (self.in_chans, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"VisionTransformer expects images of shape (B, {expected[0]}, {expected[1]}, {expected[2]}) "
                f"(model.vision.in_chans / image_size), got {tuple(images.shape)}"
            )

    def forward(
        self,
        images: torch.Tensor,
        mask_ratio: float = 0.0,
        return_attention: bool = False,
        noise: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """Encode images (B, C, H, W).

        mask_ratio > 0 keeps ``round(L * (1 - mask_ratio))`` random patches per sample
        (ranked by ``noise`` (B, L) if given); ``tokens`` then holds only those.
        ``return_attention`` adds ``cls_attention`` (B, heads, N): the last block's
        [CLS] -> patch attention probabilities with the [CLS] self-weight removed and
        renormalised, so each row sums to 1 over the returned patch tokens.
        """
        self._check_images(images)
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be within [0, 1), got {mask_ratio}")
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed.to(images.dtype)
        mask = ids_keep = ids_restore = None
        if mask_ratio > 0.0:
            x, mask, ids_keep, ids_restore = random_masking(x, mask_ratio, noise)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)

        use_checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        probs = None
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            want_attention = return_attention and i == last
            if use_checkpoint and not want_attention:
                x, _ = checkpoint(block, x, use_reentrant=False)
            else:
                x, probs = block(x, want_attention)
        x = self.norm(x)

        cls_attention = None
        if probs is not None:
            to_patches = probs[:, :, 0, 1:]
            cls_attention = to_patches / to_patches.sum(dim=-1, keepdim=True)
        return EncoderOutput(
            pooled=x[:, 0],
            tokens=x[:, 1:],
            cls_attention=cls_attention,
            mask=mask,
            ids_keep=ids_keep,
            ids_restore=ids_restore,
        )
