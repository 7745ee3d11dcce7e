"""Masked image modeling loss (MAE / MRM): MSE on normalised pixels of masked patches only."""
from __future__ import annotations

import torch


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch standardisation of the target (MAE's ``norm_pix_loss``): (B, N, P) -> (B, N, P)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=False)
    return (patches - mean) / (var + eps).sqrt()


def masked_patch_mse(pred: torch.Tensor, patches: torch.Tensor, mask: torch.Tensor, *,
                     norm_pix: bool = True) -> torch.Tensor:
    """Mean squared error over the masked patches only.

    Args:
        pred: (B, N, P) decoder predictions, one row of P pixel values per patch.
        patches: (B, N, P) the image's patches (``VisionTransformer.patchify``).
        mask: (B, N) 1 where the patch was hidden from the encoder, 0 where visible.
        norm_pix: standardise each target patch first (MAE's default; better features).
    Returns the scalar mean over masked patches of the per-patch mean squared error,
    computed in fp32; zero (with a gradient path) when nothing is masked.
    """
    if pred.shape != patches.shape or mask.shape != pred.shape[:2]:
        raise ValueError(f"masked_patch_mse: pred {tuple(pred.shape)}, patches {tuple(patches.shape)}, "
                         f"mask {tuple(mask.shape)}: expected (B, N, P), (B, N, P), (B, N)")
    target = normalize_patches(patches.float()) if norm_pix else patches.float()
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)
