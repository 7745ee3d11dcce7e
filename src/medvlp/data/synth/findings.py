"""Findings of SynthCXR: what can be wrong, how often, and where (sampling only).

How each finding is drawn lives in :mod:`.lesions` (lung, heart and bone findings) and
:mod:`.devices` (lines, tubes, pacemakers, sternotomy wires).

*Chronic* findings are drawn once per subject and persist, unchanged, in every study of that
subject: cardiomegaly, nodule, calcified granuloma, scoliosis, and the implanted devices
(pacemaker / ICD, sternotomy wires). *Acute* findings are drawn per study: effusion,
consolidation, atelectasis, edema, pneumothorax, rib fracture and the ICU devices
(endotracheal tube, central line / PICC, enteric tube). An "ICU" study (p=0.06) carries
lines and tubes and makes edema, effusion, atelectasis and consolidation likelier; effusion
and edema are likelier with cardiomegaly. Resulting per-study prevalences (20k sampled
studies, seed 0; ``tests/test_synth_findings.py`` checks the ranges in :data:`PREVALENCE`):

======================  =========  ======================  =========
Cardiomegaly            ~13%       Calcified Granuloma     ~8%
Pleural Effusion        ~15%       Pneumothorax            ~7%
Consolidation           ~11%       Scoliosis               ~8%
Atelectasis             ~11%       Support Devices         ~15%
Edema                   ~8%        Fracture                ~6%
Nodule                  ~8%        No Finding              ~35%
======================  =========  ======================  =========

Findings are placed in lung cells (side x zone) so that no finding hides another (a nodule
is never under an effusion, a pneumothorax never overlies a consolidation, ...): every
labelled finding is visible. Edema, cardiomegaly, scoliosis and devices occupy no cell
(they are diffuse, central or drawn on top); a rib fracture may share cells with a
pneumothorax, since the rib stays visible through the air.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medvlp.data.synth.anatomy import (
    SIDE_SIGN,
    Anatomy,
    heart_mask,
    lung_shape,
    rib_center_y,
)
from medvlp.data.synth.devices import sample_acute_devices, sample_chronic_devices

CLASSES = ["No Finding", "Cardiomegaly", "Pleural Effusion", "Consolidation", "Atelectasis", "Edema",
           "Nodule", "Calcified Granuloma", "Pneumothorax", "Scoliosis", "Support Devices", "Fracture"]
ZONES = ("upper", "mid", "lower")
# Fraction of the apex-to-dome height spanned by each zone's centres.
ZONE_RANGE = {"upper": (0.15, 0.33), "mid": (0.42, 0.58), "lower": (0.68, 0.82)}
# Documented per-study prevalence ranges (fractions), checked on sampled studies.
PREVALENCE = {
    "No Finding": (0.28, 0.42), "Cardiomegaly": (0.10, 0.16), "Pleural Effusion": (0.10, 0.17),
    "Consolidation": (0.08, 0.14), "Atelectasis": (0.07, 0.13), "Edema": (0.05, 0.10),
    "Nodule": (0.06, 0.10), "Calcified Granuloma": (0.06, 0.10), "Pneumothorax": (0.045, 0.08),
    "Scoliosis": (0.06, 0.10), "Support Devices": (0.09, 0.16), "Fracture": (0.045, 0.08),
}
SUBTLE = ("small", "mild")  # severities a report may hedge ("possible", "cannot be excluded")
AP_HEART = 1.12  # the largest apparent heart magnification (AP films), for safe placement

CARDIOMEGALY_CTR = {"mild": (0.55, 0.59), "moderate": (0.59, 0.64), "severe": (0.64, 0.70)}
NODULE_RADIUS = {"small": (0.055, 0.075), "large": (0.08, 0.11)}  # fraction of half width
GRANULOMA_RADIUS = (0.018, 0.032)  # smaller than a nodule, much denser
# (medial fluid level above the dome, extra meniscus height at the chest wall)
EFFUSION_LEVEL = {"small": (0.07, 0.20), "moderate": (0.20, 0.22), "large": (0.40, 0.22)}
CONSOLIDATION_SIZE = {"small": (0.05, 0.07), "moderate": (0.07, 0.11), "large": (0.09, 0.15)}  # blob sigma, spread
PNEUMOTHORAX_COLLAPSE = {"small": (0.16, 0.22), "moderate": (0.25, 0.32), "large": (0.36, 0.46)}
ATELECTASIS_KIND = {"mild": "plate", "moderate": "segmental", "severe": "lobar"}
EDEMA_HAZE = {"mild": 0.035, "moderate": 0.07, "severe": 0.12}
SCOLIOSIS_AMPLITUDE = {"mild": (0.04, 0.06), "moderate": (0.07, 0.10), "severe": (0.11, 0.15)}
# Pairs of findings that may share a lung cell: a rib stays visible through pneumothorax air.
COMPATIBLE = {frozenset(("Pneumothorax", "Fracture"))}


@dataclass
class Finding:
    """One abnormality. ``params`` holds its geometry in normalised anatomical coordinates."""

    name: str
    side: str = ""  # "left" / "right" / "bilateral" (patient side); "" if central or diffuse
    zone: str = ""  # "upper" / "mid" / "lower"; "apical" for pneumothorax; "" if diffuse
    severity: str = ""
    params: dict = field(default_factory=dict)

    def cells(self) -> set[tuple[str, str]]:
        """The lung cells (side, zone) this finding occupies; nothing else may be drawn there."""
        sides = ("left", "right") if self.side == "bilateral" else (self.side,)
        if self.name == "Pleural Effusion":
            zones = ("mid", "lower") if self.severity == "large" else ("lower",)
        elif self.name == "Pneumothorax":
            zones = ZONES  # the lateral air rim runs down the chest wall
        elif self.name == "Atelectasis" and self.severity == "severe" and self.zone == "lower":
            zones = ("mid", "lower")  # the elevated hemidiaphragm and the collapsed lobe
        elif self.name in ("Consolidation", "Nodule", "Calcified Granuloma", "Atelectasis", "Fracture"):
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
    px, big_heart = 1e-3, ctr * AP_HEART  # stay clear of the heart as an AP film shows it
    for _ in range(64):
        y = top + (base - top) * rng.uniform(lo, hi)
        x = s * (anat.lung_center_x + anat.lung_half_width * rng.uniform(-0.5, 0.45))
        probe_x = np.array([x, x - margin, x + margin, x, x])
        probe_y = np.array([y, y, y, y - margin, y + margin])
        inside = lung_shape(anat, side, probe_x, probe_y, px) * (1 - heart_mask(anat, probe_x, probe_y, px, big_heart))
        if inside.min() > 0.5:
            return float(x), float(y)
    return float(s * anat.lung_center_x), float(top + (base - top) * 0.5 * (lo + hi))


def _conflicts(f: Finding, placed: list[Finding]) -> bool:
    return any(f.cells() & g.cells() and frozenset((f.name, g.name)) not in COMPATIBLE for g in placed)


def _place(rng: np.random.Generator, options: list[tuple[Finding, float]], placed: list[Finding]) -> Finding | None:
    """Pick one of the options (weighted) that does not share a cell with a placed finding."""
    allowed = [(f, w) for f, w in options if not _conflicts(f, placed)]
    if not allowed:
        return None
    weights = np.array([w for _, w in allowed], dtype=float)
    return allowed[int(rng.choice(len(allowed), p=weights / weights.sum()))][0]


def _choice(rng: np.random.Generator, weights: dict[str, float]) -> str:
    p = np.array(list(weights.values()), dtype=float)
    return list(weights)[int(rng.choice(len(p), p=p / p.sum()))]


def _lateral(sides: dict[str, float], zones: dict[str, float], sevs: dict[str, float], name: str
             ) -> list[tuple[Finding, float]]:
    return [(Finding(name, s, z, v), ws * wz * wv) for s, ws in sides.items() for z, wz in zones.items()
            for v, wv in sevs.items()]


def sample_chronic(rng: np.random.Generator, anat: Anatomy) -> list[Finding]:
    """Subject-level findings (see the module docstring for prevalences)."""
    found: list[Finding] = []
    ctr = anat.heart_ctr
    if rng.random() < 0.13:
        severity = _choice(rng, {"mild": 0.45, "moderate": 0.35, "severe": 0.2})
        ctr = float(rng.uniform(*CARDIOMEGALY_CTR[severity]))
        found.append(Finding("Cardiomegaly", severity=severity, params={"ctr": ctr}))
    if rng.random() < 0.08:
        side, zone = str(rng.choice(["left", "right"])), str(rng.choice(ZONES))
        severity = _choice(rng, {"small": 0.6, "large": 0.4})
        radius = float(rng.uniform(*NODULE_RADIUS[severity]))
        x, y = _zone_point(rng, anat, ctr, side, zone, margin=radius + 0.04)
        found.append(Finding("Nodule", side, zone, severity, {"x": x, "y": y, "radius": radius}))
    if rng.random() < 0.08:  # old granulomatous infection: upper zones most often
        chosen = _place(rng, _lateral({"right": 1, "left": 1}, {"upper": 0.6, "mid": 0.3, "lower": 0.1},
                                      {"small": 1}, "Calcified Granuloma"), found)
        if chosen is not None:
            radius = float(rng.uniform(*GRANULOMA_RADIUS))
            x, y = _zone_point(rng, anat, ctr, chosen.side, chosen.zone, margin=radius + 0.04)
            chosen.params = {"x": x, "y": y, "radius": radius}
            found.append(chosen)
    if rng.random() < 0.08:
        severity = _choice(rng, {"mild": 0.55, "moderate": 0.3, "severe": 0.15})
        convexity = str(rng.choice(["right", "left"]))
        found.append(Finding("Scoliosis", "", "", severity, {
            "amplitude": float(rng.uniform(*SCOLIOSIS_AMPLITUDE[severity])) * SIDE_SIGN[convexity],
            "convexity": convexity, "s_curve": bool(rng.random() < 0.3)}))
    found.extend(Finding("Support Devices", side, "", "", p) for side, p in sample_chronic_devices(rng, anat))
    return found


def sample_acute(rng: np.random.Generator, anat: Anatomy, chronic: list[Finding]) -> list[Finding]:
    """Study-level findings given the subject's chronic ones."""
    placed = list(chronic)
    cardiomegaly = next((f for f in chronic if f.name == "Cardiomegaly"), None)
    ctr = float(cardiomegaly.params["ctr"]) if cardiomegaly else anat.heart_ctr
    icu = bool(rng.random() < 0.06)
    found = [Finding("Support Devices", side, "", "", p) for side, p in sample_acute_devices(rng, anat, icu)]

    edema = rng.random() < 0.05 + 0.14 * bool(cardiomegaly) + 0.2 * icu
    if edema:
        severity = _choice(rng, {"mild": 0.45, "moderate": 0.35, "severe": 0.2})
        found.append(Finding("Edema", "", "", severity, {"haze": EDEMA_HAZE[severity],
                                                          "kerley": bool(rng.random() < 0.7)}))
    if rng.random() < 0.09 + 0.25 * bool(cardiomegaly) + 0.25 * edema + 0.2 * icu:
        options = _lateral({"right": 0.4, "left": 0.3, "bilateral": 0.3}, {"lower": 1.0},
                           {"small": 0.45, "moderate": 0.35, "large": 0.2}, "Pleural Effusion")
        chosen = _place(rng, options, placed)
        if chosen is not None:
            base, meniscus = EFFUSION_LEVEL[chosen.severity]
            chosen.params = {"level": base + float(rng.uniform(-0.03, 0.03)), "meniscus": meniscus}
            found.append(chosen)
            placed.append(chosen)
    if rng.random() < 0.10 + 0.25 * icu:
        options = _lateral({"right": 0.55, "left": 0.45}, {"upper": 0.3, "mid": 0.3, "lower": 0.4},
                           {"small": 0.3, "moderate": 0.45, "large": 0.25}, "Consolidation")
        chosen = _place(rng, options, placed)
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
            placed.append(chosen)
    if rng.random() < 0.09 + 0.3 * icu:
        chosen = _sample_atelectasis(rng, anat, ctr, placed)
        if chosen is not None:
            found.append(chosen)
            placed.append(chosen)
    if rng.random() < 0.075:
        options = _lateral({"right": 1, "left": 1}, {"apical": 1}, {"small": 0.4, "moderate": 0.35, "large": 0.25},
                           "Pneumothorax")
        chosen = _place(rng, options, placed)
        if chosen is not None:
            chosen.params = {"collapse": float(rng.uniform(*PNEUMOTHORAX_COLLAPSE[chosen.severity]))}
            found.append(chosen)
            placed.append(chosen)
    if rng.random() < 0.065:
        chosen = _sample_fracture(rng, anat, placed)
        if chosen is not None:
            found.append(chosen)
    return found


def _sample_atelectasis(rng: np.random.Generator, anat: Anatomy, ctr: float, placed: list[Finding]) -> Finding | None:
    """Plate-like (mild, may be bibasilar), segmental (moderate) or lobar with volume loss (severe)."""
    sevs = {"mild": 0.5, "moderate": 0.3, "severe": 0.2}
    options = _lateral({"right": 0.45, "left": 0.45}, {"upper": 0.15, "mid": 0.25, "lower": 0.6}, sevs, "Atelectasis")
    options += [(Finding("Atelectasis", "bilateral", "lower", "mild"), 0.25)]  # bibasilar plate-like
    chosen = _place(rng, options, placed)
    return None if chosen is None else _atelectasis_params(rng, anat, ctr, chosen)


def _atelectasis_params(rng: np.random.Generator, anat: Anatomy, ctr: float, chosen: Finding) -> Finding:
    kind = ATELECTASIS_KIND[chosen.severity]
    sides = ("left", "right") if chosen.side == "bilateral" else (chosen.side,)
    bands = []
    for side in sides:
        x, y = _zone_point(rng, anat, ctr, side, chosen.zone, margin=0.05)
        bands.append([x, y])
    chosen.params = {
        "kind": kind, "centers": bands,
        "tilt": float(rng.uniform(-0.25, 0.25)),  # radians; plates lie near horizontal
        "length": float(rng.uniform(0.14, 0.24)), "thickness": float(rng.uniform(0.012, 0.02)),
        "extent": float(rng.uniform(0.09, 0.13) if kind == "segmental" else rng.uniform(0.12, 0.17)),
        "volume_loss": float(rng.uniform(0.04, 0.08)) if kind == "lobar" and chosen.zone == "lower" else 0.0,
    }
    return chosen


def _sample_fracture(rng: np.random.Generator, anat: Anatomy, placed: list[Finding]) -> Finding | None:
    """A lateral rib fracture: acute (cortical break with a step) or healing (callus)."""
    options = _lateral({"right": 1, "left": 1}, {"upper": 0.3, "mid": 0.4, "lower": 0.3}, {"": 1}, "Fracture")
    chosen = _place(rng, options, placed)
    return None if chosen is None else _fracture_params(rng, anat, chosen)


def _fracture_params(rng: np.random.Generator, anat: Anatomy, chosen: Finding) -> Finding:
    s = SIDE_SIGN[chosen.side]
    top, base = anat.lung_top, anat.dome_y(chosen.side)
    x = s * anat.thorax_half_width * float(rng.uniform(0.72, 0.9))
    target = top + (base - top) * float(rng.uniform(*ZONE_RANGE[chosen.zone]))
    ks = np.arange(10)
    k = int(ks[np.argmin(np.abs(np.array([rib_center_y(anat, int(i), x) for i in ks]) - target))])
    chosen.params = {"x": float(x), "y": float(rib_center_y(anat, k, x)), "rib": k,
                     "kind": "healing" if rng.random() < 0.4 else "acute",
                     "step": float(rng.uniform(0.016, 0.028)) * float(rng.choice([-1.0, 1.0]))}
    return chosen


def effective_ctr(anat: Anatomy, findings: list[Finding]) -> float:
    for f in findings:
        if f.name == "Cardiomegaly":
            return float(f.params["ctr"])
    return anat.heart_ctr


def labels_for(findings: list[Finding]) -> dict[str, bool]:
    """Presence of every class; "No Finding" iff nothing else is present."""
    present = {c: any(f.name == c for f in findings) for c in CLASSES[1:]}
    return {"No Finding": not any(present.values()), **present}


# ------------------------------------------------------------------- one finding on request
# Default weights of make_finding where a constraint is not given (those of the sampler above).
_SIDES_LR = {"right": 1.0, "left": 1.0}
_ZONES_EVEN = {"upper": 1.0, "mid": 1.0, "lower": 1.0}
_GRADED = {"mild": 0.45, "moderate": 0.35, "severe": 0.2}
_CHOICES: dict[str, tuple[dict, dict, dict]] = {  # name -> (sides, zones, severities)
    "Cardiomegaly": ({"": 1}, {"": 1}, _GRADED),
    "Edema": ({"": 1}, {"": 1}, _GRADED),
    "Scoliosis": ({"": 1}, {"": 1}, {"mild": 0.55, "moderate": 0.3, "severe": 0.15}),
    "Nodule": (_SIDES_LR, _ZONES_EVEN, {"small": 0.6, "large": 0.4}),
    "Calcified Granuloma": (_SIDES_LR, {"upper": 0.6, "mid": 0.3, "lower": 0.1}, {"small": 1}),
    "Pleural Effusion": ({"right": 0.4, "left": 0.3, "bilateral": 0.3}, {"lower": 1},
                         {"small": 0.45, "moderate": 0.35, "large": 0.2}),
    "Consolidation": ({"right": 0.55, "left": 0.45}, {"upper": 0.3, "mid": 0.3, "lower": 0.4},
                      {"small": 0.3, "moderate": 0.45, "large": 0.25}),
    "Atelectasis": ({"right": 0.45, "left": 0.45, "bilateral": 0.0}, {"upper": 0.15, "mid": 0.25, "lower": 0.6},
                    {"mild": 0.5, "moderate": 0.3, "severe": 0.2}),
    "Pneumothorax": (_SIDES_LR, {"apical": 1}, {"small": 0.4, "moderate": 0.35, "large": 0.25}),
    "Fracture": (_SIDES_LR, {"upper": 0.3, "mid": 0.4, "lower": 0.3}, {"": 1}),
}
# A requested severity a class does not grade with falls back to the nearest one it does.
_SEVERITY_NEAR = {"small": ("mild",), "mild": ("small",), "moderate": ("large", "severe"),
                  "large": ("severe", "moderate"), "severe": ("large", "moderate")}
DEVICE_KINDS = ("pacemaker", "icd", "sternotomy", "cvc", "picc", "ett", "ng")


def _constrain(weights: dict[str, float], value: str | None, near: tuple[str, ...] = ()) -> dict[str, float]:
    """``weights`` restricted to ``value`` (or its nearest stand-in); all of them if it fits none."""
    if value:
        for v in (value, *near):
            if v in weights:
                return {v: 1.0}
    return {k: w for k, w in weights.items() if w > 0}


def make_finding(rng: np.random.Generator, anat: Anatomy, name: str, side: str | None = None,
                 zone: str | None = None, severity: str | None = None, placed: list[Finding] | tuple = (),
                 ctr: float | None = None, device: str | None = None) -> Finding | None:
    """One finding of class ``name`` with the given constraints, or None if it cannot be placed.

    Unset constraints are drawn with the sampler's weights. ``side``: left / right, or
    bilateral for Pleural Effusion and Atelectasis (other lung findings are one-sided: ask for
    each side); for Scoliosis it is the convexity; Cardiomegaly and Edema ignore it.
    A zone is ignored where the class has a fixed one (effusion: lower; pneumothorax: apical);
    a severity the class does not use maps to its nearest ("mild" nodule -> "small").
    ``placed``: findings already drawn; a lung finding that would share their cells (the
    occupancy rule of :meth:`Finding.cells`) gives None. ``device``: one of
    :data:`DEVICE_KINDS` for Support Devices (default: pacemaker). Parameters are drawn
    from ``rng`` exactly as the sampler draws them, so the result renders like a sampled one.
    """
    placed = list(placed)
    ctr = effective_ctr(anat, placed) if ctr is None else ctr
    if name == "Support Devices":
        return _make_device(rng, anat, device or "pacemaker")
    if name not in _CHOICES:
        raise ValueError(f"make_finding: unknown class {name!r}; drawable: {sorted(_CHOICES) + ['Support Devices']}")
    sides, zones, sevs = _CHOICES[name]
    if name == "Scoliosis":
        severity = _choice(rng, _constrain(sevs, severity, _SEVERITY_NEAR.get(severity or "", ())))
        convexity = side if side in ("left", "right") else str(rng.choice(["right", "left"]))
        return Finding("Scoliosis", "", "", severity, {
            "amplitude": float(rng.uniform(*SCOLIOSIS_AMPLITUDE[severity])) * SIDE_SIGN[convexity],
            "convexity": convexity, "s_curve": bool(rng.random() < 0.3)})
    if side == "bilateral" and "bilateral" not in sides and "" not in sides:
        raise ValueError(f"make_finding: {name} is drawn on one side; ask for 'left' and 'right' separately")
    options = _lateral(_constrain(sides, side), _constrain(zones, zone),
                       _constrain(sevs, severity, _SEVERITY_NEAR.get(severity or "", ())), name)
    chosen = _place(rng, options, placed)
    if chosen is None:
        return None
    if name == "Cardiomegaly":
        chosen.params = {"ctr": float(rng.uniform(*CARDIOMEGALY_CTR[chosen.severity]))}
    elif name == "Edema":
        chosen.params = {"haze": EDEMA_HAZE[chosen.severity], "kerley": bool(rng.random() < 0.7)}
    elif name in ("Nodule", "Calcified Granuloma"):
        radius = float(rng.uniform(*(NODULE_RADIUS[chosen.severity] if name == "Nodule" else GRANULOMA_RADIUS)))
        x, y = _zone_point(rng, anat, ctr, chosen.side, chosen.zone, margin=radius + 0.04)
        chosen.params = {"x": x, "y": y, "radius": radius}
    elif name == "Pleural Effusion":
        base, meniscus = EFFUSION_LEVEL[chosen.severity]
        chosen.params = {"level": base + float(rng.uniform(-0.03, 0.03)), "meniscus": meniscus}
    elif name == "Consolidation":
        sigma, spread = CONSOLIDATION_SIZE[chosen.severity]
        x, y = _zone_point(rng, anat, ctr, chosen.side, chosen.zone, margin=0.06)
        n = int(rng.integers(4, 8))
        chosen.params = {"x": x, "y": y, "sigma": sigma,
                         "dx": [round(float(v), 4) for v in rng.normal(0.0, spread, n)],
                         "dy": [round(float(v), 4) for v in rng.normal(0.0, 0.7 * spread, n)],
                         "weight": [round(float(v), 4) for v in rng.uniform(0.5, 1.0, n)]}
    elif name == "Atelectasis":
        _atelectasis_params(rng, anat, ctr, chosen)
    elif name == "Pneumothorax":
        chosen.params = {"collapse": float(rng.uniform(*PNEUMOTHORAX_COLLAPSE[chosen.severity]))}
    else:  # Fracture
        _fracture_params(rng, anat, chosen)
    return chosen


def _make_device(rng: np.random.Generator, anat: Anatomy, device: str) -> Finding:
    # The device builders are private to .devices; they are the single definition of each geometry.
    from medvlp.data.synth import devices as dv

    if device in ("pacemaker", "icd"):
        side, params = dv._cardiac_device(rng, anat, device)
    elif device == "sternotomy":
        side, params = dv._sternotomy(rng, anat)
    elif device in ("cvc", "picc"):
        side, params = dv._central_line(rng, anat, device)
    elif device == "ett":
        side, params = dv._ett(rng, anat)
    elif device == "ng":
        side, params = dv._ng(rng, anat)
    else:
        raise ValueError(f"make_finding: unknown device {device!r}; choose one of {DEVICE_KINDS}")
    return Finding("Support Devices", side, "", "", params)
