"""Drawing the findings of SynthCXR onto a chest (everything but support devices' geometry).

Each renderer edits a :class:`Canvas` in anatomical coordinates and returns the finding's
soft mask (0..1): the ground-truth region, from which boxes and mask images are derived.
A renderer changes the image only inside its mask (up to the one-pixel soft edge), so a
finding can be checked by rendering a study with and without it.

The drawing order in :data:`RENDERERS` matters: air first, then fluid and collapse, then
opacities inside what remains aerated, then diffuse haze, dense spots, bones, devices.
Very small or thin structures (granulomas, plate-like atelectasis, Kerley lines, wires) are
never drawn thinner than about a pixel, so a labelled finding is visible at any image size.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from medvlp.data.synth.anatomy import (
    LUNG_AIR,
    RIB,
    SIDE_SIGN,
    SPINE,
    TISSUE,
    Anatomy,
    diaphragm_y,
    ellipse_distance,
    heart_mask,
    lung_shape,
    rib_center_y,
    rib_half_thickness,
    soft_inside,
    spine_mask,
)
from medvlp.data.synth.devices import device_mask
from medvlp.data.synth.findings import Finding


@dataclass
class Canvas:
    """Mutable state the renderers edit, all on the anatomical grid."""

    x: np.ndarray
    y: np.ndarray
    px: float
    density: np.ndarray
    marking_weight: np.ndarray  # scales lung markings: findings that hide them lower it, edema raises it
    lungs: dict[str, np.ndarray]  # aerated lung per side; findings that fill it lower it
    normal_ctr: float  # this subject's normal heart as this film shows it (AP magnifies it)


def _sides(finding: Finding) -> tuple[str, ...]:
    return ("left", "right") if finding.side == "bilateral" else (finding.side,)


def _rotated(c: Canvas, cx: float, cy: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    cos, sin = np.cos(angle), np.sin(angle)
    dx, dy = c.x - cx, c.y - cy
    return dx * cos + dy * sin, -dx * sin + dy * cos


def draw_pneumothorax(c: Canvas, anat: Anatomy, f: Finding, ctr: float) -> np.ndarray:
    """Air rim between chest wall and the collapsed lung: dark, no markings, thin pleural line."""
    side = f.side
    full = lung_shape(anat, side, c.x, c.y, c.px)
    collapsed = lung_shape(anat, side, c.x, c.y, c.px, shrink=float(f.params["collapse"]))
    outside_heart = 1.0 - heart_mask(anat, c.x, c.y, c.px, ctr)
    rim = np.clip(full - collapsed, 0.0, 1.0) * outside_heart
    # Pleural line: a one-pixel bright band on the collapsed lung's edge, inside the cavity.
    line = 4.0 * collapsed * (1.0 - collapsed) * full * outside_heart
    c.density = c.density - 0.2 * rim + 0.22 * line
    c.marking_weight = c.marking_weight * (1.0 - rim)
    c.lungs[side] = c.lungs[side] * (1.0 - rim)  # no lung (so no haze, no vessels) in the rim
    return np.clip(rim, 0.0, 1.0)


def draw_effusion(c: Canvas, anat: Anatomy, f: Finding, ctr: float) -> np.ndarray:
    """Fluid in the base: fills the costophrenic angle and climbs the wall in a meniscus."""
    mask = np.zeros_like(c.x)
    for side in _sides(f):
        s = SIDE_SIGN[side]
        lateral = np.clip((s * c.x - (anat.lung_center_x - anat.lung_half_width)) / (2 * anat.lung_half_width), 0, 1)
        level = anat.dome_y(side) - float(f.params["level"]) - float(f.params["meniscus"]) * lateral ** 2
        # The fluid top fades over ~2 px like real layering fluid; it ends at the heart border.
        fluid = lung_shape(anat, side, c.x, c.y, c.px) * soft_inside(level - c.y, 2.0 * c.px)
        fluid = fluid * (1.0 - heart_mask(anat, c.x, c.y, c.px, ctr))
        mask = np.maximum(mask, fluid)
        c.lungs[side] = c.lungs[side] * (1.0 - fluid)
    target = TISSUE + 0.13
    c.density = c.density + mask * np.maximum(target - c.density, 0.0)
    c.marking_weight = c.marking_weight * (1.0 - mask)
    return mask


def draw_atelectasis(c: Canvas, anat: Anatomy, f: Finding, ctr: float) -> np.ndarray:
    """Plate-like band (mild), dense wedge (segmental) or collapsed lobe with volume loss (lobar)."""
    p, mask = f.params, np.zeros_like(c.x)
    tilt = float(p["tilt"])
    for side, (cx, cy) in zip(_sides(f), p["centers"]):
        lung = c.lungs[side]
        u, v = _rotated(c, cx, cy, tilt)
        if p["kind"] == "plate":
            dist = np.hypot(np.maximum(np.abs(u) - 0.5 * float(p["length"]), 0.0), v)
            opacity = soft_inside(dist - max(float(p["thickness"]), 0.5 * c.px), c.px) * lung
            c.density = c.density + 0.2 * opacity
        elif p["kind"] == "segmental" or f.zone == "mid":
            e = float(p["extent"])
            opacity = soft_inside(ellipse_distance(u, v, 0.0, 0.0, e, 0.5 * e), c.px) * lung
            c.density = c.density + 0.24 * opacity
        else:  # lobar: everything beyond the displaced fissure (above it for an upper lobe)
            beyond = v if f.zone == "lower" else -v
            opacity = soft_inside(-beyond, c.px) * lung
            loss = float(p["volume_loss"])
            if loss > 0:  # the hemidiaphragm rises into the emptied space
                raised = lung * soft_inside(diaphragm_y(anat, side, c.x) - loss - c.y, c.px)
                c.density = c.density + (LUNG_AIR + 0.1) * raised
                opacity = opacity * (1.0 - raised)
                mask = np.maximum(mask, raised)
            c.density = c.density + 0.24 * opacity
        c.lungs[side] = lung * (1.0 - 0.8 * opacity)
        mask = np.maximum(mask, opacity)
    c.marking_weight = c.marking_weight * (1.0 - 0.8 * mask)
    return mask


def draw_consolidation(c: Canvas, anat: Anatomy, f: Finding, ctr: float) -> np.ndarray:
    """Patchy airspace opacity: a cluster of smooth blobs confined to the aerated lung."""
    p = f.params
    dx, dy, w = (np.asarray(p[k], dtype=float)[:, None, None] for k in ("dx", "dy", "weight"))
    sigma = float(p["sigma"])
    blobs = w * np.exp(-((c.x - float(p["x"]) - dx) ** 2 + (c.y - float(p["y"]) - dy) ** 2) / (2 * sigma ** 2))
    patch = np.clip(blobs.sum(axis=0) * 1.3, 0.0, 1.0) * c.lungs[f.side]
    patch = patch * (patch > 0.02)  # no faint tail across the whole lung
    c.density = c.density + 0.30 * patch
    c.marking_weight = c.marking_weight * (1.0 - 0.7 * patch)
    return patch


def draw_edema(c: Canvas, anat: Anatomy, f: Finding, ctr: float) -> np.ndarray:
    """Perihilar and basal haze, prominent indistinct vessels, Kerley B lines at the bases."""
    haze = float(f.params["haze"])
    mask = np.zeros_like(c.x)
    for side, s in SIDE_SIGN.items():
        lung = c.lungs[side]
        hx = s * (anat.lung_center_x - 0.55 * anat.lung_half_width)
        hy = anat.lung_center_y - 0.45 * anat.lung_half_height
        perihilar = np.exp(-(((c.x - hx) / 0.3) ** 2 + ((c.y - hy) / 0.42) ** 2))
        basal = np.clip((c.y - anat.dome_y(side) + 0.3) / 0.3, 0.0, 1.0)
        c.density = c.density + haze * (0.35 + 0.65 * np.maximum(perihilar, 0.6 * basal)) * lung
        if f.params.get("kerley"):  # short horizontal lines reaching the lateral pleura
            ys = anat.dome_y(side) - 0.06 - 0.045 * np.arange(5)[:, None, None]
            x_mid = s * (anat.lung_center_x + 0.85 * anat.lung_half_width)
            dist = np.hypot(c.y - ys, np.maximum(np.abs(c.x - x_mid) - 0.035, 0.0)).min(axis=0)
            c.density = c.density + 0.07 * soft_inside(dist - max(0.005, 0.45 * c.px), c.px) * lung
        mask = np.maximum(mask, lung)
    # Vascular congestion: vessels stand out (and blur into the haze as it thickens).
    gain = {"mild": 0.9, "moderate": 0.6, "severe": 0.3}[f.severity]
    c.marking_weight = c.marking_weight * (1.0 + gain * mask)
    return mask


def draw_nodule(c: Canvas, anat: Anatomy, f: Finding, ctr: float) -> np.ndarray:
    """Small round dense spot with a soft edge."""
    r = float(f.params["radius"])
    disc = soft_inside(np.hypot(c.x - float(f.params["x"]), c.y - float(f.params["y"])) - r, c.px)
    c.density = c.density + 0.30 * disc
    return disc


def draw_granuloma(c: Canvas, anat: Anatomy, f: Finding, ctr: float) -> np.ndarray:
    """A tiny, sharply defined, very dense (calcified) spot; at least about a pixel across."""
    r = max(float(f.params["radius"]), 0.8 * c.px)  # a pixel centre always lies inside
    disc = soft_inside(np.hypot(c.x - float(f.params["x"]), c.y - float(f.params["y"])) - r, 0.7 * c.px)
    c.density = c.density + 0.5 * disc
    return disc


def draw_cardiomegaly(c: Canvas, anat: Anatomy, f: Finding, ctr: float) -> np.ndarray:
    """The enlarged heart is drawn by the anatomy; the mask is the part beyond a normal heart."""
    normal = heart_mask(anat, c.x, c.y, c.px, c.normal_ctr)
    return np.clip(heart_mask(anat, c.x, c.y, c.px, ctr) - normal, 0.0, 1.0)


def scoliosis_offset(anat: Anatomy, params: dict, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lateral displacement of the spine's axis at y, where the curve is) for a scoliosis."""
    top, bottom = anat.lung_top - 0.05, max(anat.dome_right, anat.dome_left) + 0.12
    t = np.clip((y - top) / (bottom - top), 0.0, 1.0)
    amp = float(params["amplitude"])
    shape = 0.8 * np.sin(2 * np.pi * t) if params.get("s_curve") else np.sin(np.pi * t)
    return amp * shape, (t > 0) & (t < 1)


def draw_scoliosis(c: Canvas, anat: Anatomy, f: Finding, ctr: float) -> np.ndarray:
    """The thoracic spine bowed laterally (C or S curve); the mask is the old and new column."""
    offset, span = scoliosis_offset(anat, f.params, c.y)
    straight, curved = spine_mask(c.x, c.y, c.px), spine_mask(c.x, c.y, c.px, center=offset)
    c.density = c.density + SPINE * (curved - straight)
    displaced = np.abs(offset) > 0.25 * abs(float(f.params["amplitude"]))
    return np.maximum(curved, straight) * (span & displaced)


def draw_fracture(c: Canvas, anat: Anatomy, f: Finding, ctr: float) -> np.ndarray:
    """A break in one lateral rib: cortical gap and step (acute) or a gap with callus (healing)."""
    p = f.params
    x0, y0, k, step = float(p["x"]), float(p["y"]), int(p["rib"]), float(p["step"])
    s = SIDE_SIGN[f.side]
    thick = rib_half_thickness(anat, c.x)
    along = rib_center_y(anat, k, c.x)

    def band(shift: float) -> np.ndarray:
        return np.exp(-(((c.y - along - shift) / thick) ** 4))

    gap = np.exp(-((c.x - x0) / max(0.015, 0.6 * c.px)) ** 2)
    delta = -1.3 * RIB * band(0.0) * gap  # the lucent fracture line
    if p["kind"] == "acute":  # the lateral fragment steps off, overlapping the medial one
        lateral = np.clip(s * (c.x - x0) / max(0.01, c.px), 0.0, 1.0)
        delta = delta + RIB * (band(step) - band(0.0)) * lateral * (1.0 - gap)
        delta = delta + 0.8 * RIB * band(0.5 * step) * np.exp(-((c.x - x0 - s * 0.02) / 0.015) ** 2)
    else:
        callus = soft_inside(ellipse_distance(c.x, c.y, x0, y0, 0.035, 0.05), 2.0 * c.px)
        delta = delta + 0.07 * callus
    region = soft_inside(ellipse_distance(c.x, c.y, x0, y0, max(0.055, 2.0 * c.px), max(0.05, 2.0 * c.px)), c.px)
    c.density = c.density + delta * region
    return region


def draw_device(c: Canvas, anat: Anatomy, f: Finding, ctr: float) -> np.ndarray:
    mask, added = device_mask(f.params, c.x, c.y, c.px)
    c.density = c.density + added
    return mask


# Drawing order matters: air first, then fluid and collapse, then opacities, then on top.
RENDERERS: dict[str, Callable[[Canvas, Anatomy, Finding, float], np.ndarray]] = {
    "Pneumothorax": draw_pneumothorax,
    "Pleural Effusion": draw_effusion,
    "Atelectasis": draw_atelectasis,
    "Consolidation": draw_consolidation,
    "Edema": draw_edema,
    "Nodule": draw_nodule,
    "Calcified Granuloma": draw_granuloma,
    "Cardiomegaly": draw_cardiomegaly,
    "Scoliosis": draw_scoliosis,
    "Fracture": draw_fracture,
    "Support Devices": draw_device,
}
