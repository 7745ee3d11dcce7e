"""Image preprocessing and medical-safe augmentation, in PIL + torch (no torchvision).

Preprocessing is part of a checkpoint's config (:class:`Preprocess`), so a trained model
always sees images prepared the way it was trained: grayscale float in [0, 1],
padded to square (no distortion of anatomy), resized, normalised, channels repeated
when the encoder expects RGB.

Augmentation is deliberately mild and anatomy-preserving: small rotation, scale and
shift, brightness/contrast/gamma jitter. No flips (laterality matters in reports) and
no hue or grayscale ops. Each call takes an explicit ``torch.Generator`` so that the
augmentation of sample ``i`` in epoch ``e`` is a pure function of (seed, e, i): exact
resume and results independent of the number of data-loader workers.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from medvlp.data.shard_access import ImageRef, load_ref
from medvlp.errors import DataError


@dataclass(frozen=True)
class Preprocess:
    image_size: int
    in_chans: int = 1
    mean: float = 0.5
    std: float = 0.25
    pad_to_square: bool = True

    @classmethod
    def from_config(cls, cfg) -> "Preprocess":
        v, d = cfg.model.vision, cfg.data
        return cls(v.image_size, v.in_chans, d.mean, d.std, d.pad_to_square)

    def to_dict(self) -> dict:
        return asdict(self)


def load_image(path: str) -> np.ndarray:
    """Read an 8- or 16-bit grayscale/RGB image file as float32 (H, W) in [0, 1]."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I"):
                arr = np.asarray(im, dtype=np.float32)
                peak = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
                return np.clip(arr / peak, 0.0, 1.0)
            return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def _pad_square(arr: np.ndarray) -> np.ndarray:
    h, w = arr.shape
    if h == w:
        return arr
    size = max(h, w)
    out = np.zeros((size, size), dtype=arr.dtype)
    top, left = (size - h) // 2, (size - w) // 2
    out[top : top + h, left : left + w] = arr
    return out


def to_tensor(arr: np.ndarray, pre: Preprocess) -> torch.Tensor:
    """(H, W) float array in [0, 1] -> (1, S, S) float tensor in [0, 1], square and resized."""
    if pre.pad_to_square:
        arr = _pad_square(arr)
    x = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
    if x.shape[-2:] != (pre.image_size, pre.image_size):
        x = F.interpolate(x, size=(pre.image_size, pre.image_size), mode="bilinear", antialias=True, align_corners=False)
    return x[0].clamp_(0.0, 1.0)


class ImageCache:
    """Prepared images (the output of :func:`to_tensor`) kept in memory, up to a byte budget.

    Decoding a PNG/DICOM and padding/resizing it costs about as much as the rest of the input
    pipeline together; a dataset that fits in RAM is read from disk once per process instead of
    once per epoch. Entries are exact (float32, after resizing), so results do not depend on
    the cache. When full, the cache stops adding (no eviction churn: a dataset larger than the
    budget keeps its first part cached). Entries are shared: never modify a returned tensor in
    place. Each data-loader worker process holds its own cache (use ``persistent_workers``)."""

    def __init__(self, budget_mb: float = 0.0):
        self.configure(budget_mb)

    def configure(self, budget_mb: float) -> None:
        budget = int(budget_mb * 2**20)
        if budget != getattr(self, "budget", None):
            self.budget, self.used, self.entries = budget, 0, {}

    def get(self, path: ImageRef, pre: Preprocess) -> torch.Tensor:
        """``path``: an image file or a shard member (:func:`medvlp.data.shard_access.image_ref`)."""
        if self.budget <= 0:
            return to_tensor(load_ref(path), pre)
        key = (path, pre.image_size, pre.pad_to_square)
        x = self.entries.get(key)
        if x is None:
            x = to_tensor(load_ref(path), pre)
            size = x.numel() * x.element_size()
            if self.used + size <= self.budget:
                self.entries[key] = x
                self.used += size
        return x


IMAGE_CACHE = ImageCache()  # one per process; sized by data.image_cache_mb (train loop, loaders)


def augment(x: torch.Tensor, gen: torch.Generator, *, max_rotation: float = 5.0, scale: tuple[float, float] = (0.92, 1.08),
            max_shift: float = 0.05, contrast: float = 0.15, brightness: float = 0.08, gamma: float = 0.15) -> torch.Tensor:
    """Random mild affine + intensity jitter of a (1, S, S) image in [0, 1]."""
    u = torch.rand(7, generator=gen)
    angle = math.radians((2 * u[0].item() - 1) * max_rotation)
    s = scale[0] + (scale[1] - scale[0]) * u[1].item()
    tx, ty = ((2 * u[2].item() - 1) * max_shift * 2, (2 * u[3].item() - 1) * max_shift * 2)
    cos, sin = math.cos(angle) / s, math.sin(angle) / s
    theta = torch.tensor([[cos, -sin, tx], [sin, cos, ty]], dtype=x.dtype)[None]
    grid = F.affine_grid(theta, [1, *x.shape], align_corners=False)
    x = F.grid_sample(x[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    g = math.exp((2 * u[4].item() - 1) * gamma)
    x = x.clamp(0, 1).pow(g)
    c = 1 + (2 * u[5].item() - 1) * contrast
    b = (2 * u[6].item() - 1) * brightness
    mid = x.mean()
    return ((x - mid) * c + mid + b).clamp_(0.0, 1.0)


def normalize(x: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    x = (x - pre.mean) / pre.std
    if pre.in_chans > 1:
        x = x.expand(pre.in_chans, -1, -1).contiguous()
    return x
