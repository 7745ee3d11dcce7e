"""Acquisition and rendering of one SynthCXR study: anatomy + findings -> 8-bit image + masks.

A study's acquisition (patient position, exposure, contrast, noise) is drawn per study. The
grid is mapped from image to anatomical coordinates by the inverse of the positioning
(rotation, shift, magnification), so anatomy and findings are drawn once in their own frame
and land consistently in the image. Noise comes from its own seed stored in the acquisition:
rendering the same study with and without a finding differs only where the finding is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medvlp.data.synth.anatomy import Anatomy, render_anatomy
from medvlp.data.synth.findings import RENDERERS, Canvas, Finding, effective_ctr


@dataclass(frozen=True)
class Acquisition:
    """Per-study positioning and exposure."""

    view: str  # "PA" or "AP" (portable: flatter contrast, more noise)
    rotation: float  # radians
    shift_x: float  # normalised units
    shift_y: float
    magnification: float
    brightness: float
    contrast: float
    gamma: float
    heel: float  # exposure gradient from top to bottom (anode heel effect)
    noise_sigma: float
    noise_seed: int


def sample_acquisition(rng: np.random.Generator) -> Acquisition:
    ap = bool(rng.random() < 0.1)
    return Acquisition(
        view="AP" if ap else "PA",
        rotation=float(rng.uniform(-0.07, 0.07)),
        shift_x=float(rng.uniform(-0.05, 0.05)),
        shift_y=float(rng.uniform(-0.05, 0.05)),
        magnification=float(rng.uniform(0.95, 1.04)),
        brightness=float(rng.uniform(-0.05, 0.05)),
        contrast=float(rng.uniform(0.8, 0.95) if ap else rng.uniform(0.95, 1.25)),
        gamma=float(rng.uniform(0.85, 1.15)),
        heel=float(rng.uniform(-0.03, 0.03)),
        noise_sigma=float(rng.uniform(0.025, 0.04) if ap else rng.uniform(0.01, 0.025)),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


@dataclass
class Rendering:
    image: np.ndarray  # (size, size) uint8
    masks: dict[str, np.ndarray]  # finding name -> (size, size) float32 in [0, 1]


def image_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in normalised image coordinates ([-1, 1], y down)."""
    c = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
    return np.meshgrid(c, c, indexing="xy")


def to_anatomical(acq: Acquisition, xi: np.ndarray, yi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Invert the positioning: image coordinates -> the anatomy's own frame."""
    cos, sin = math.cos(acq.rotation), math.sin(acq.rotation)
    x, y = (xi - acq.shift_x) / acq.magnification, (yi - acq.shift_y) / acq.magnification
    return cos * x + sin * y, -sin * x + cos * y


def to_pixels(acq: Acquisition, x: float, y: float, size: int) -> tuple[float, float]:
    """Anatomical point -> pixel coordinates (column, row) in the rendered image."""
    cos, sin = math.cos(acq.rotation), math.sin(acq.rotation)
    xi = (cos * x - sin * y) * acq.magnification + acq.shift_x
    yi = (sin * x + cos * y) * acq.magnification + acq.shift_y
    return (xi + 1.0) / 2.0 * size - 0.5, (yi + 1.0) / 2.0 * size - 0.5


def render_study(anat: Anatomy, acq: Acquisition, findings: list[Finding], size: int) -> Rendering:
    """Render one study. Pass a subset of ``findings`` to see what each one adds."""
    xi, yi = image_grid(size)
    x, y = to_anatomical(acq, xi, yi)
    px = 2.0 / size / acq.magnification  # one pixel in anatomical units
    ctr = effective_ctr(anat, findings)
    layers = render_anatomy(anat, x, y, px, ctr)
    canvas = Canvas(x=x, y=y, px=px, density=layers.density, marking_weight=np.ones_like(x),
                    lungs=dict(layers.lungs))
    masks: dict[str, np.ndarray] = {}
    for name, draw in RENDERERS.items():
        for f in findings:
            if f.name == name:
                masks[name] = draw(canvas, anat, f, ctr).astype(np.float32)
    lung = canvas.lungs["left"] + canvas.lungs["right"]
    density = canvas.density + layers.markings * canvas.marking_weight * lung

    value = acq.contrast * (density - 0.45) + 0.45 + acq.brightness + acq.heel * yi
    value = np.clip(value, 0.0, 1.0) ** acq.gamma
    noise = np.random.default_rng(acq.noise_seed).normal(0.0, acq.noise_sigma, size=(size, size))
    image = np.round(np.clip(value + noise, 0.0, 1.0) * 255.0).astype(np.uint8)
    return Rendering(image=image, masks=masks)


def mask_geometry(mask: np.ndarray, threshold: float = 0.5) -> dict[str, list[float] | list[int]]:
    """Centre (mask-weighted, pixels) and bounding box [x0, y0, x1, y1) of a soft mask."""
    rows, cols = np.nonzero(mask >= threshold)
    if rows.size == 0:
        return {}
    w = mask[rows, cols]
    return {
        "center": [round(float((cols * w).sum() / w.sum()), 2), round(float((rows * w).sum() / w.sum()), 2)],
        "bbox": [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1],
    }
