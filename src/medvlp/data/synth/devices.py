"""Support devices of SynthCXR: where lines, tubes and implants go, and how they are drawn.

Each device is one "Support Devices" finding whose ``params`` say what it is and hold its
geometry in anatomical coordinates (JSON-friendly lists):

* ``device``: ``ett`` (endotracheal tube), ``cvc`` (internal jugular or subclavian central
  venous catheter), ``picc``, ``ng`` (nasogastric / enteric tube), ``pacemaker``, ``icd``
  (defibrillator, with a shock coil), ``sternotomy`` (median sternotomy wires);
* ``lines``: ``[{"points": [[x, y], ...], "width": w, "density": d}]`` smoothed polylines;
* ``blobs``: ``[[cx, cy, rx, ry, density]]`` rounded rectangles (a pacemaker generator);
* ``rings``: ``[[cx, cy, r, density]]`` wire loops (sternotomy wires);
* ``tip``: ``[x, y]`` and for tubes and lines where it lies (``tip_cm`` above the carina
  for an ETT, ``tip_site`` for lines and enteric tubes, ``vein`` for central lines).

Implants (pacemaker / ICD, sternotomy wires) are chronic; tubes and lines are acute and
mostly come together in "ICU" studies. Devices are drawn last, on top of everything, as
thin very dense lines, so they never hide a finding and they are visible at any size (a
line is at least ~1 px wide).
"""
from __future__ import annotations

import numpy as np

from medvlp.data.synth.anatomy import (
    CM,
    Anatomy,
    carina_y,
    ellipse_distance,
    heart_top,
    soft_inside,
)

DEVICE_NAMES = {"ett": "endotracheal tube", "cvc": "central venous catheter", "picc": "PICC line",
                "ng": "enteric tube", "pacemaker": "pacemaker", "icd": "defibrillator",
                "sternotomy": "sternotomy wires"}


def _smooth(points: list[tuple[float, float]], iterations: int = 2) -> list[list[float]]:
    """Chaikin corner cutting: a gently curved path through the control polygon's corners."""
    p = np.asarray(points, dtype=float)
    for _ in range(iterations):
        q = np.empty((2 * (len(p) - 1), 2))
        q[0::2] = 0.75 * p[:-1] + 0.25 * p[1:]
        q[1::2] = 0.25 * p[:-1] + 0.75 * p[1:]
        p = np.vstack([p[:1], q, p[-1:]])
    return [[round(float(a), 4), round(float(b), 4)] for a, b in p]


def _line(points, width: float, density: float) -> dict:
    return {"points": _smooth(points), "width": width, "density": density}


def _tip_y(rng: np.random.Generator, anat: Anatomy, site: str) -> float:
    top = heart_top(anat)
    return {"SVC": carina_y(anat) + float(rng.uniform(0.03, 0.10)),
            "cavoatrial junction": top + float(rng.uniform(0.02, 0.05)),
            "right atrium": top + float(rng.uniform(0.10, 0.16))}[site]


def _central_line(rng: np.random.Generator, anat: Anatomy, kind: str) -> tuple[str, dict]:
    t = anat.lung_top
    site = str(rng.choice(["SVC", "cavoatrial junction", "right atrium"], p=[0.6, 0.25, 0.15]))
    tip = (-0.06, _tip_y(rng, anat, site))
    if kind == "picc":
        side = str(rng.choice(["right", "left"]))
        s = -1.0 if side == "right" else 1.0
        path = [(s * 1.02, t + 0.14), (s * 0.7, t + 0.03), (s * 0.4, t - 0.01), (s * 0.13, t + 0.09),
                (-0.04, carina_y(anat)), tip]
        vein = "basilic"
    elif rng.random() < 0.7:
        side, vein = "right", "internal jugular"
        path = [(-0.22, -1.05), (-0.15, t - 0.05), (-0.075, t + 0.12), tip]
    else:
        side, vein = "left", "subclavian"
        path = [(0.62, t - 0.05), (0.35, t + 0.0), (0.12, t + 0.1), (-0.04, carina_y(anat)), tip]
    return side, {"device": kind, "vein": vein, "tip_site": site, "tip": list(tip),
                  "lines": [_line(path, 0.006, 0.30)]}


def _ett(rng: np.random.Generator, anat: Anatomy) -> tuple[str, dict]:
    tip_cm = round(float(rng.uniform(2.0, 7.0)), 1)
    tip = (0.0, carina_y(anat) - tip_cm * CM)
    path = [(0.01, -1.05), (0.005, anat.lung_top), tip]
    return "", {"device": "ett", "tip_cm": tip_cm, "tip": list(tip), "lines": [_line(path, 0.011, 0.20)]}


def _ng(rng: np.random.Generator, anat: Anatomy) -> tuple[str, dict]:
    dome, top = anat.dome_left, heart_top(anat)
    path = [(0.015, -1.05), (0.02, anat.lung_top), (0.03, carina_y(anat)), (0.05, top + 0.1), (0.1, dome)]
    if rng.random() < 0.85:
        site = "stomach"
        path += [(0.28, dome + 0.1), (0.34, dome + 0.19)]
    else:
        site = "distal esophagus"  # a malposition reports must call out
        path[-1] = (0.07, top + 0.22)
    return "", {"device": "ng", "tip_site": site, "tip": list(path[-1]), "lines": [_line(path, 0.0075, 0.26)]}


def _cardiac_device(rng: np.random.Generator, anat: Anatomy, kind: str) -> tuple[str, dict]:
    side = "left" if rng.random() < 0.85 else "right"
    s = -1.0 if side == "right" else 1.0
    t, top, dome = anat.lung_top, heart_top(anat), anat.dome_left
    gx, gy = s * (anat.lung_center_x + 0.02), t - 0.03  # infraclavicular pocket, above the apex
    entry = [(gx - s * 0.07, gy), (s * 0.15, t + 0.02), (-0.04, carina_y(anat) + 0.05), (-0.07, top + 0.1)]
    lines = [_line(entry + [(0.0, top + 0.3), (0.12, dome + 0.04)], 0.0065, 0.34)]  # right ventricle
    if rng.random() < 0.6:  # dual chamber: a second lead curling into the right atrial appendage
        lines.append(_line(entry + [(-0.08, top + 0.16), (-0.02, top + 0.1)], 0.0065, 0.34))
    if kind == "icd":  # the shock coil: a thick dense segment along the ventricular lead
        lines.append(_line([(-0.06, top + 0.16), (0.0, top + 0.3), (0.1, dome + 0.03)], 0.014, 0.30))
    size = (0.085, 0.06) if kind == "icd" else (0.07, 0.05)
    return side, {"device": kind, "lines": lines, "blobs": [[gx, gy, size[0], size[1], 0.6]],
                  "leads": len(lines) - (kind == "icd")}


def _sternotomy(rng: np.random.Generator, anat: Anatomy) -> tuple[str, dict]:
    n = int(rng.integers(5, 8))
    ys = np.linspace(anat.lung_top + 0.18, heart_top(anat) + 0.2, n)
    rings = [[round(float(rng.normal(0.0, 0.01)), 4), round(float(y), 4), 0.022, 0.5] for y in ys]
    return "", {"device": "sternotomy", "rings": rings}


def sample_chronic_devices(rng: np.random.Generator, anat: Anatomy) -> list[tuple[str, dict]]:
    """Implants as (side, params): pacemaker or ICD (p=0.035), sternotomy wires (p=0.035)."""
    out = []
    if rng.random() < 0.035:
        out.append(_cardiac_device(rng, anat, "icd" if rng.random() < 0.3 else "pacemaker"))
    if rng.random() < 0.035:
        out.append(_sternotomy(rng, anat))
    return out


def sample_acute_devices(rng: np.random.Generator, anat: Anatomy, icu: bool) -> list[tuple[str, dict]]:
    """Tubes and lines as (side, params): an ICU study has at least one; others a PICC at 2.5%."""
    out = []
    if icu:
        wants = [rng.random() < 0.7, rng.random() < 0.75, rng.random() < 0.6]
        if not any(wants):
            wants[int(rng.integers(3))] = True
        if wants[0]:
            out.append(_ett(rng, anat))
        if wants[1]:
            out.append(_central_line(rng, anat, "cvc" if rng.random() < 0.7 else "picc"))
        if wants[2]:
            out.append(_ng(rng, anat))
    elif rng.random() < 0.025:
        out.append(_central_line(rng, anat, "picc" if rng.random() < 0.6 else "cvc"))
    return out


def _window(x: np.ndarray, y: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (x >= lo[0]) & (x <= hi[0]) & (y >= lo[1]) & (y <= hi[1])


def device_mask(params: dict, x: np.ndarray, y: np.ndarray, px: float) -> tuple[np.ndarray, np.ndarray]:
    """(soft mask, added attenuation) of one device on the grid.

    Only grid points near the device are evaluated (a window around its bounding box), so a
    thin line costs little at any image size.
    """
    mask, add = np.zeros_like(x), np.zeros_like(x)
    for line in params.get("lines", ()):
        p = np.asarray(line["points"], dtype=float)
        w = max(float(line["width"]), 0.55 * px)  # never thinner than about a pixel
        pad = w + 2 * px
        sel = _window(x, y, p.min(axis=0) - pad, p.max(axis=0) + pad)
        xs, ys = x[sel][None, :], y[sel][None, :]
        a, b = p[:-1, :, None], p[1:, :, None]  # segments (n, 2, 1)
        d = b - a
        t = np.clip(((xs - a[:, 0]) * d[:, 0] + (ys - a[:, 1]) * d[:, 1]) / (d[:, 0] ** 2 + d[:, 1] ** 2 + 1e-12), 0, 1)
        dist = np.hypot(xs - a[:, 0] - t * d[:, 0], ys - a[:, 1] - t * d[:, 1]).min(axis=0)
        m = soft_inside(dist - w, px)
        mask[sel] = np.maximum(mask[sel], m)
        add[sel] = np.maximum(add[sel], float(line["density"]) * m)
    for cx, cy, rx, ry, dens in params.get("blobs", ()):
        m = soft_inside(ellipse_distance(x, y, cx, cy, rx, ry, power=4.0), px)
        mask, add = np.maximum(mask, m), np.maximum(add, dens * m)
    for cx, cy, r, dens in params.get("rings", ()):
        w = max(0.005, 0.55 * px)
        ring = soft_inside(np.abs(ellipse_distance(x, y, cx, cy, 0.8 * r, r)) - w, px)
        mask, add = np.maximum(mask, ring), np.maximum(add, dens * ring)
    return mask, add
