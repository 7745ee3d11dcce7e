"""Findings of SynthCXR: what can be wrong, how often, where, and how each is drawn.

Cardiomegaly and nodules are *chronic*: drawn once per subject and present, unchanged, in
every study of that subject. Effusion, consolidation and pneumothorax are *acute*: drawn per
study. Prevalences are ~20-30% each with a built-in co-occurrence (effusion is likelier with
cardiomegaly), and findings are placed in lung cells (side x zone) so that no finding hides
another: a lower-zone nodule is never under an effusion, a pneumothorax never overlies a
consolidation, and so on. Every finding visible in the image is therefore true in the label.

Each renderer edits a :class:`Canvas` in anatomical coordinates and returns the finding's
soft mask (0..1), which becomes the ground-truth region (bounding box now, masks later).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from medvlp.data.synth.anatomy import (
    SIDE_SIGN, TISSUE, Anatomy, heart_mask, lung_shape, soft_inside,
)

CLASSES = ["No Finding", "Cardiomegaly", "Pleural Effusion", "Consolidation", "Nodule", "Pneumothorax"]
ZONES = ("upper", "mid", "lower")
# Fraction of the apex-to-dome height spanned by each zone's centres.
ZONE_RANGE = {"upper": (0.15, 0.33), "mid": (0.42, 0.58), "lower": (0.68, 0.82)}

CARDIOMEGALY_CTR = {"mild": (0.55, 0.59), "moderate": (0.59, 0.64), "severe": (0.64, 0.70)}
NODULE_RADIUS = {"small": (0.065, 0.085), "large": (0.09, 0.12)}  # fraction of half width
# (medial fluid level above the dome, extra meniscus height at the chest wall)
EFFUSION_LEVEL = {"small": (0.08, 0.24), "moderate": (0.20, 0.22), "large": (0.40, 0.22)}
CONSOLIDATION_SIZE = {"small": (0.05, 0.08), "moderate": (0.07, 0.11), "large": (0.09, 0.15)}  # blob sigma, spread
PNEUMOTHORAX_COLLAPSE = {"small": (0.18, 0.24), "moderate": (0.26, 0.33), "large": (0.36, 0.46)}


@dataclass
class Finding:
    """One abnormality. ``params`` holds its geometry in normalised anatomical coordinates."""

    name: str
    side: str = ""  # "left" / "right" / "bilateral" (patient side); "" for the heart
    zone: str = ""  # "upper" / "mid" / "lower"; "apical" for pneumothorax; "" if diffuse
    severity: str = ""
    params: dict[str, float | list[float]] = field(default_factory=dict)

    def cells(self) -> set[tuple[str, str]]:
        """The lung cells (side, zone) this finding occupies; nothing else may be drawn there."""
        sides = ("left", "right") if self.side == "bilateral" else (self.side,)
        if self.name == "Pleural Effusion":
            zones = ("mid", "lower") if self.severity == "large" else ("lower",)
        elif self.name == "Pneumothorax":
            zones = ZONES  # the lateral air rim runs down the chest wall
        elif self.name in ("Consolidation", "Nodule"):
            zones = (self.zone,)
        else:
            return set()
        return {(s, z) for s in sides for z in zones}


# ------------------------------------------------------------------------------------ sampling
def _zone_point(rng: np.random.Generator, anat: Anatomy, ctr: float, side: str, zone: str,
                margin: float) -> tuple[float, float]:
    """A point inside the aerated lung of (side, zone), at least ``margin`` from its borders."""
    s = SIDE_SIGN[side]
    top, base = anat.lung_top, anat.dome_y(side)
    lo, hi = ZONE_RANGE[zone]
    px = 1e-3
    for _ in range(64):
        y = top + (base - top) * rng.uniform(lo, hi)
        x = s * (anat.lung_center_x + anat.lung_half_width * rng.uniform(-0.5, 0.45))
        probe_x = np.array([x, x - margin, x + margin, x, x])
        probe_y = np.array([y, y, y, y - margin, y + margin])
        inside = lung_shape(anat, side, probe_x, probe_y, px) * (1 - heart_mask(anat, probe_x, probe_y, px, ctr))
        if inside.min() > 0.5:
            return float(x), float(y)
    return float(s * anat.lung_center_x), float(top + (base - top) * 0.5 * (lo + hi))


def _free(finding: Finding, occupied: set[tuple[str, str]]) -> bool:
    return not (finding.cells() & occupied)


def sample_chronic(rng: np.random.Generator, anat: Anatomy) -> list[Finding]:
    """Subject-level findings: cardiomegaly (p=0.25) and a nodule (p=0.24)."""
    found: list[Finding] = []
    ctr = anat.heart_ctr
    if rng.random() < 0.25:
        severity = str(rng.choice(list(CARDIOMEGALY_CTR), p=[0.45, 0.35, 0.2]))
        ctr = float(rng.uniform(*CARDIOMEGALY_CTR[severity]))
        found.append(Finding("Cardiomegaly", severity=severity, params={"ctr": ctr}))
    if rng.random() < 0.24:
        side, zone = str(rng.choice(["left", "right"])), str(rng.choice(ZONES))
        severity = str(rng.choice(list(NODULE_RADIUS), p=[0.6, 0.4]))
        radius = float(rng.uniform(*NODULE_RADIUS[severity]))
        x, y = _zone_point(rng, anat, ctr, side, zone, margin=radius + 0.04)
        found.append(Finding("Nodule", side, zone, severity, {"x": x, "y": y, "radius": radius}))
    return found


def _place(rng: np.random.Generator, options: list[tuple[Finding, float]],
           occupied: set[tuple[str, str]]) -> Finding | None:
    """Pick one of the options (weighted) that does not overlap occupied cells."""
    allowed = [(f, w) for f, w in options if _free(f, occupied)]
    if not allowed:
        return None
    weights = np.array([w for _, w in allowed], dtype=float)
    return allowed[int(rng.choice(len(allowed), p=weights / weights.sum()))][0]


def sample_acute(rng: np.random.Generator, anat: Anatomy, chronic: list[Finding]) -> list[Finding]:
    """Study-level findings given the subject's chronic ones."""
    occupied = set().union(*(f.cells() for f in chronic)) if chronic else set()
    cardiomegaly = next((f for f in chronic if f.name == "Cardiomegaly"), None)
    ctr = float(cardiomegaly.params["ctr"]) if cardiomegaly else anat.heart_ctr
    found: list[Finding] = []

    if rng.random() < (0.45 if cardiomegaly else 0.16):
        side_w = {"right": 0.4, "left": 0.3, "bilateral": 0.3}
        sev_w = {"small": 0.4, "moderate": 0.4, "large": 0.2}
        options = [(Finding("Pleural Effusion", s, "lower", v), side_w[s] * sev_w[v]) for s in side_w for v in sev_w]
        chosen = _place(rng, options, occupied)
        if chosen is not None:
            found.append(chosen)
            occupied |= chosen.cells()

    if rng.random() < 0.26:
        sev_w = {"small": 0.3, "moderate": 0.45, "large": 0.25}
        options = [(Finding("Consolidation", s, z, v), sev_w[v]) for s in ("left", "right") for z in ZONES for v in sev_w]
        chosen = _place(rng, options, occupied)
        if chosen is not None:
            sigma, spread = CONSOLIDATION_SIZE[chosen.severity]
            x, y = _zone_point(rng, anat, ctr, chosen.side, chosen.zone, margin=0.06)
            n = int(rng.integers(4, 8))
            chosen.params = {
                "x": x, "y": y, "sigma": sigma,
                "dx": [round(float(v), 4) for v in rng.normal(0.0, spread, n)],
                "dy": [round(float(v), 4) for v in rng.normal(0.0, 0.7 * spread, n)],
                "weight": [round(float(v), 4) for v in rng.uniform(0.5, 1.0, n)],
            }
            found.append(chosen)
            occupied |= chosen.cells()

    if rng.random() < 0.30:
        sev_w = {"small": 0.4, "moderate": 0.35, "large": 0.25}
        options = [(Finding("Pneumothorax", s, "apical", v), sev_w[v]) for s in ("left", "right") for v in sev_w]
        chosen = _place(rng, options, occupied)
        if chosen is not None:
            chosen.params = {"collapse": float(rng.uniform(*PNEUMOTHORAX_COLLAPSE[chosen.severity]))}
            found.append(chosen)
    for f in found:
        if f.name == "Pleural Effusion":
            base, meniscus = EFFUSION_LEVEL[f.severity]
            f.params = {"level": base + float(rng.uniform(-0.03, 0.03)), "meniscus": meniscus}
    return found


# ----------------------------------------------------------------------------------- rendering
@dataclass
class Canvas:
    """Mutable state the renderers edit, all on the anatomical grid."""

    x: np.ndarray
    y: np.ndarray
    px: float
    density: np.ndarray
    marking_weight: np.ndarray  # 1 where lung markings show; findings that hide them lower it
    lungs: dict[str, np.ndarray]  # aerated lung per side; findings that fill it lower it


def _sides(finding: Finding) -> tuple[str, ...]:
    return ("left", "right") if finding.side == "bilateral" else (finding.side,)


def draw_pneumothorax(c: Canvas, anat: Anatomy, f: Finding, ctr: float) -> np.ndarray:
    """Air rim between chest wall and the collapsed lung: dark, no markings, thin pleural line."""
    side = f.side
    full = lung_shape(anat, side, c.x, c.y, c.px)
    collapsed = lung_shape(anat, side, c.x, c.y, c.px, shrink=float(f.params["collapse"]))
    rim = np.clip(full - collapsed, 0.0, 1.0) * (1.0 - heart_mask(anat, c.x, c.y, c.px, ctr))
    # Pleural line: a one-pixel bright band on the collapsed lung's edge, inside the cavity.
    edge = 4.0 * collapsed * (1.0 - collapsed)
    line = edge * full * (1.0 - heart_mask(anat, c.x, c.y, c.px, ctr))
    c.density = c.density - 0.2 * rim + 0.22 * line
    c.marking_weight = c.marking_weight * (1.0 - rim)
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


def draw_consolidation(c: Canvas, anat: Anatomy, f: Finding, ctr: float) -> np.ndarray:
    """Patchy airspace opacity: a cluster of smooth blobs confined to the aerated lung."""
    p = f.params
    dx, dy, w = (np.asarray(p[k], dtype=float)[:, None, None] for k in ("dx", "dy", "weight"))
    sigma = float(p["sigma"])
    blobs = w * np.exp(-((c.x - float(p["x"]) - dx) ** 2 + (c.y - float(p["y"]) - dy) ** 2) / (2 * sigma ** 2))
    patch = np.clip(blobs.sum(axis=0) * 1.3, 0.0, 1.0) * c.lungs[f.side]
    c.density = c.density + 0.30 * patch
    c.marking_weight = c.marking_weight * (1.0 - 0.7 * patch)
    return patch


def draw_nodule(c: Canvas, anat: Anatomy, f: Finding, ctr: float) -> np.ndarray:
    """Small round dense spot with a soft edge."""
    r = float(f.params["radius"])
    disc = soft_inside(np.hypot(c.x - float(f.params["x"]), c.y - float(f.params["y"])) - r, c.px)
    c.density = c.density + 0.30 * disc
    return disc


def draw_cardiomegaly(c: Canvas, anat: Anatomy, f: Finding, ctr: float) -> np.ndarray:
    """The enlarged heart is drawn by the anatomy; the mask is the part beyond a normal heart."""
    normal = heart_mask(anat, c.x, c.y, c.px, anat.heart_ctr)
    return np.clip(heart_mask(anat, c.x, c.y, c.px, ctr) - normal, 0.0, 1.0)


# Drawing order matters: air first, then fluid, then opacities inside what remains aerated.
RENDERERS: dict[str, Callable[[Canvas, Anatomy, Finding, float], np.ndarray]] = {
    "Pneumothorax": draw_pneumothorax,
    "Pleural Effusion": draw_effusion,
    "Consolidation": draw_consolidation,
    "Nodule": draw_nodule,
    "Cardiomegaly": draw_cardiomegaly,
}


def effective_ctr(anat: Anatomy, findings: list[Finding]) -> float:
    for f in findings:
        if f.name == "Cardiomegaly":
            return float(f.params["ctr"])
    return anat.heart_ctr


def labels_for(findings: list[Finding]) -> dict[str, bool]:
    """Presence of every class; "No Finding" iff nothing else is present."""
    present = {c: any(f.name == c for f in findings) for c in CLASSES[1:]}
    return {"No Finding": not any(present.values()), **present}
