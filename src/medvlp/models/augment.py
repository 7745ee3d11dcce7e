"""Medical-safe image views for uni-modal self-supervision (SLIP, Uni-Mlip), on batched tensors.

Two views of a radiograph must differ in what does not change a reading and keep what does:
- a mild random affine (rotation up to ``max_rotation`` degrees, isotropic scale within
  ``scale``, translation up to ``max_shift`` of the side), border-padded;
- contrast (around each image's mean) and gamma changes within ranges, plus Gaussian noise;
- no hue or grayscale operations, and horizontal flip OFF by default: laterality is part of
  the report ("left effusion"), so a flipped image no longer matches its text.

Images arrive normalised as the loader makes them (``(x - mean) / std``); intensity changes are
applied on the [0, 1] scale and the result is normalised again. Vectorised (one
``affine_grid`` / ``grid_sample`` per batch); every draw comes from ``generator``.

:func:`feature_noise` is the feature-level counterpart (Gaussian noise on embeddings).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ViewConfig:
    max_rotation: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    max_shift: float = 0.05
    contrast: tuple[float, float] = (0.8, 1.2)
    gamma: tuple[float, float] = (0.8, 1.25)
    noise_std: float = 0.02
    hflip: bool = False
    mean: float = 0.5
    std: float = 0.25


def _uniform(n: int, lo: float, hi: float, generator, device) -> torch.Tensor:
    return (lo + (hi - lo) * torch.rand(n, generator=generator)).to(device)


def random_view(images: torch.Tensor, cfg: ViewConfig = ViewConfig(), generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """One random view of each image of ``images`` (B, C, H, W); same shape and dtype."""
    b, dev = images.shape[0], images.device
    angle = _uniform(b, -cfg.max_rotation, cfg.max_rotation, generator, dev) * math.pi / 180
    scale = _uniform(b, *cfg.scale, generator, dev)
    shift = _uniform(2 * b, -cfg.max_shift, cfg.max_shift, generator, dev).view(b, 2) * 2  # grid units span 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    if cfg.hflip:
        flip = torch.rand(b, generator=generator).to(dev) < 0.5
        theta[:, 0, 0] = torch.where(flip, -theta[:, 0, 0], theta[:, 0, 0])
        theta[:, 1, 0] = torch.where(flip, -theta[:, 1, 0], theta[:, 1, 0])
    x = images.float()
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = (x * cfg.std + cfg.mean).clamp(0, 1)  # back to [0, 1]
    c = _uniform(b, *cfg.contrast, generator, dev).view(b, 1, 1, 1)
    mu = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mu) * c + mu).clamp(0, 1)
    x = x.clamp(min=1e-6) ** _uniform(b, *cfg.gamma, generator, dev).view(b, 1, 1, 1)
    if cfg.noise_std > 0:
        # one noise field per image shared by its channels: a grey image copied to 3 channels stays grey
        x = x + cfg.noise_std * torch.randn((x.shape[0], 1, *x.shape[2:]), generator=generator).to(dev)
    return ((x - cfg.mean) / cfg.std).to(images.dtype)


def feature_noise(features: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Feature-level perturbation (Uni-Mlip): ``features`` (..., D) plus Gaussian noise whose
    standard deviation is ``std`` times each row's own (detached) feature std, so ``std`` means
    the same at any width or feature scale. Differentiable in ``features``."""
    scale = features.detach().float().std(dim=-1, keepdim=True)
    noise = torch.randn(features.shape, generator=generator).to(features.device)
    return features + (std * scale * noise).to(features.dtype)
