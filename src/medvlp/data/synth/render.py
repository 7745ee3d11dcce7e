"""Acquisition and rendering of one SynthCXR study: anatomy + findings -> 8-bit image + masks.

A study's acquisition (patient position, exposure, contrast, noise) is drawn per study. A
portable AP film (15% of studies) looks different as on real ones: the heart is magnified
(x1.06-1.12, never enough to reach the cardiomegaly threshold of a normal heart), the lungs
are lower in volume (domes raised), the clavicles project higher, contrast is flatter and
noise stronger. Most films carry a side marker: a small letter-free bright square in a top
corner. The
grid is mapped from image to anatomical coordinates by the inverse of the positioning
(rotation, shift, magnification), so anatomy and findings are drawn once in their own frame
and land consistently in the image. Noise comes from its own seed stored in the acquisition:
rendering the same study with and without a finding differs only where the finding is.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from medvlp.data.synth.anatomy import Anatomy, render_anatomy
from medvlp.data.synth.findings import Finding, effective_ctr
from medvlp.data.synth.lesions import RENDERERS, Canvas


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
    heart_scale: float = 1.0  # apparent heart magnification (AP > 1)
    dome_lift: float = 0.0  # how much higher the domes project (AP: lower lung volumes)
    clavicle_lift: float = 0.0
    marker: str = ""  # "" (none), "left" or "right": image corner of the side marker


def sample_acquisition(rng: np.random.Generator) -> Acquisition:
    ap = bool(rng.random() < 0.15)
    return Acquisition(
        view="AP" if ap else "PA",
        rotation=float(rng.uniform(-0.09, 0.09) if ap else rng.uniform(-0.07, 0.07)),
        shift_x=float(rng.uniform(-0.05, 0.05)),
        shift_y=float(rng.uniform(-0.05, 0.05)),
        magnification=float(rng.uniform(0.95, 1.04)),
        brightness=float(rng.uniform(-0.05, 0.05)),
        contrast=float(rng.uniform(0.8, 0.95) if ap else rng.uniform(0.95, 1.25)),
        gamma=float(rng.uniform(0.85, 1.15)),
        heel=float(rng.uniform(-0.03, 0.03)),
        noise_sigma=float(rng.uniform(0.025, 0.045) if ap else rng.uniform(0.01, 0.025)),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
        heart_scale=float(rng.uniform(1.06, 1.12)) if ap else 1.0,
        dome_lift=float(rng.uniform(0.015, 0.035)) if ap else 0.0,
        clavicle_lift=float(rng.uniform(0.05, 0.1)) if ap else 0.0,
        marker=str(rng.choice(["", "left", "right"], p=[0.3, 0.35, 0.35])),
    )


@dataclass
class Rendering:
    image: np.ndarray  # (size, size) uint8
    masks: dict[str, np.ndarray]  # class name -> (size, size) float32 in [0, 1], union of its findings
    instance_masks: list[np.ndarray] = field(default_factory=list)  # one per finding, in input order


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


def _marker(acq: Acquisition, xi: np.ndarray, yi: np.ndarray, size: int) -> np.ndarray:
    """Soft square (about 5% of the width) in a top corner of the image, outside the chest."""
    if not acq.marker:
        return np.zeros_like(xi)
    cx, half, px = (-0.9 if acq.marker == "right" else 0.9), 0.035, 2.0 / size
    inside = np.maximum(np.abs(xi - cx), np.abs(yi + 0.9)) - max(half, 1.5 * px)
    return np.clip(0.5 - inside / (2.0 * px), 0.0, 1.0)


def render_study(anat: Anatomy, acq: Acquisition, findings: list[Finding], size: int) -> Rendering:
    """Render one study. Pass a subset of ``findings`` to see what each one adds.

    ``masks`` holds one mask per present class (union over its findings, e.g. several
    devices); ``instance_masks[i]`` is the mask of ``findings[i]``.
    """
    xi, yi = image_grid(size)
    x, y = to_anatomical(acq, xi, yi)
    px = 2.0 / size / acq.magnification  # one pixel in anatomical units
    if acq.dome_lift:  # lower lung volumes on a supine / portable film
        anat = dataclasses.replace(anat, dome_right=anat.dome_right - acq.dome_lift,
                                   dome_left=anat.dome_left - acq.dome_lift)
    ctr = effective_ctr(anat, findings) * acq.heart_scale
    layers = render_anatomy(anat, x, y, px, ctr, clavicle_lift=acq.clavicle_lift)
    canvas = Canvas(x=x, y=y, px=px, density=layers.density, marking_weight=np.ones_like(x),
                    lungs=dict(layers.lungs), normal_ctr=anat.heart_ctr * acq.heart_scale)
    masks: dict[str, np.ndarray] = {}
    instance: list[np.ndarray] = [np.zeros((size, size), np.float32)] * len(findings)
    rank = {name: k for k, name in enumerate(RENDERERS)}
    for i in sorted(range(len(findings)), key=lambda j: rank[findings[j].name]):
        f = findings[i]
        instance[i] = RENDERERS[f.name](canvas, anat, f, ctr).astype(np.float32)
        masks[f.name] = np.maximum(masks[f.name], instance[i]) if f.name in masks else instance[i]
    lung = canvas.lungs["left"] + canvas.lungs["right"]
    density = canvas.density + layers.markings * canvas.marking_weight * lung

    value = acq.contrast * (density - 0.45) + 0.45 + acq.brightness + acq.heel * yi
    # Highlights roll off instead of clipping (as film and detector response do), so a wire over
    # the dense spine or mediastinum still shows.
    value = np.where(value > 0.8, 0.8 + 0.2 * np.tanh((value - 0.8) / 0.2), value)
    value = np.clip(value, 0.0, 1.0) ** acq.gamma
    value = np.maximum(value, 0.95 * _marker(acq, xi, yi, size))
    noise = np.random.default_rng(acq.noise_seed).normal(0.0, acq.noise_sigma, size=(size, size))
    image = np.round(np.clip(value + noise, 0.0, 1.0) * 255.0).astype(np.uint8)
    return Rendering(image=image, masks=masks, instance_masks=instance)


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


def finding_meta(f: Finding, mask: np.ndarray | None, acq: Acquisition, size: int) -> dict:
    """JSON ground truth of one finding: name, side, zone, severity, ``center`` and ``bbox``
    (pixels, from ``mask``), plus finding-specific fields (exact nodule/granuloma centre and
    radius, CTR, device type and tip, atelectasis kind, scoliosis convexity, fractured rib)."""
    meta: dict = {"name": f.name, "side": f.side, "zone": f.zone, "severity": f.severity}
    if mask is not None:
        meta.update(mask_geometry(mask))
    p = f.params
    if f.name in ("Nodule", "Calcified Granuloma"):
        cx, cy = to_pixels(acq, float(p["x"]), float(p["y"]), size)
        meta["center"] = [round(cx, 2), round(cy, 2)]
        meta["radius"] = round(float(p["radius"]) * acq.magnification * size / 2.0, 2)
    elif f.name == "Cardiomegaly":
        meta["ctr"] = round(float(p["ctr"]), 3)
    elif f.name == "Support Devices":
        meta["device"] = p["device"]
        meta.update({k: p[k] for k in ("tip_cm", "tip_site", "vein", "leads") if k in p})
        if "tip" in p:
            tx, ty = to_pixels(acq, float(p["tip"][0]), float(p["tip"][1]), size)
            meta["tip"] = [round(tx, 2), round(ty, 2)]
    elif f.name == "Atelectasis":
        meta["kind"] = p["kind"]
    elif f.name == "Edema":
        meta["kerley_lines"] = bool(p.get("kerley"))
    elif f.name == "Scoliosis":
        meta.update(convexity=p["convexity"], curve="S" if p.get("s_curve") else "C")
    elif f.name == "Fracture":
        meta.update(rib=int(p["rib"]) + 2, kind=p["kind"])  # posterior rib number (rib 0 drawn is the 2nd)
    return meta
