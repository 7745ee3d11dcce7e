"""Normal chest anatomy of SynthCXR: per-subject parameters and their rendering.

Geometry is in normalised coordinates: x and y run over [-1, 1] across the image (x to the
image right, y down), so every length is a fraction of the half image width and the same
parameters render at any ``image_size``. Views are frontal (PA): the patient's right is on
the image left (side sign -1) and the patient's left on the image right (+1).

Rendering works in *attenuation* (bright = dense) built additively from soft masks: body
soft tissue, air in the lungs (with vascular markings), heart and mediastinum, abdomen under
the diaphragm domes, spine, ribs and clavicles. :mod:`.render` turns attenuation into pixels.
Shape helpers (``lung_shape``, ``diaphragm_y``, ``heart_mask``) are public within the package
because the finding renderers draw relative to the same anatomy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIDE_SIGN = {"right": -1.0, "left": 1.0}  # patient side -> image x direction (PA view)
SPINE = 0.16  # extra attenuation of the vertebral column
RIB = 0.065  # extra attenuation of a posterior rib
TISSUE = 0.45  # attenuation of soft tissue; everything else is relative to it
LUNG_AIR = 0.31  # how much air lowers attenuation inside the lungs
MARKING_AMPLITUDE = 0.14


@dataclass(frozen=True)
class Anatomy:
    """One subject's chest: constant across that subject's studies."""

    body_half_width: float
    lung_center_x: float  # |x| of each lung's centre
    lung_half_width: float
    lung_top: float  # y of the apices
    dome_right: float  # y of the top of each hemidiaphragm (the right sits higher)
    dome_left: float
    dome_drop: float  # how far a dome falls from its top to the costophrenic angle
    heart_ctr: float  # normal cardiothoracic ratio of this subject
    heart_half_height: float
    rib_start: float
    rib_spacing: float
    marking_angles: tuple[float, ...]  # vessel directions from the hilum (radians from lateral)
    gastric_bubble: bool

    @property
    def thorax_half_width(self) -> float:
        """Half of the inner thoracic width (lateral lung margins), the CTR denominator."""
        return self.lung_center_x + self.lung_half_width

    def dome_y(self, side: str) -> float:
        return self.dome_right if side == "right" else self.dome_left

    @property
    def lung_center_y(self) -> float:
        # The lung ellipse is centred low so its widest part sits at the bases, as in real
        # lungs, and the diaphragm cuts it there leaving sharp costophrenic angles.
        return 0.5 * (self.dome_right + self.dome_left) + 0.08

    @property
    def lung_half_height(self) -> float:
        return self.lung_center_y - self.lung_top


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one subject's anatomy (body size, heart size, lung shape, ribs, vessels)."""
    body = rng.uniform(0.80, 0.95)
    lung_half_width = rng.uniform(0.25, 0.30)
    thorax = body - rng.uniform(0.10, 0.15)
    dome_right = rng.uniform(0.36, 0.48)
    return Anatomy(
        body_half_width=float(body),
        lung_center_x=float(thorax - lung_half_width),
        lung_half_width=float(lung_half_width),
        lung_top=float(rng.uniform(-0.84, -0.72)),
        dome_right=float(dome_right),
        dome_left=float(dome_right + rng.uniform(0.02, 0.06)),
        dome_drop=float(rng.uniform(0.12, 0.20)),
        heart_ctr=float(rng.uniform(0.38, 0.47)),
        heart_half_height=float(rng.uniform(0.25, 0.30)),
        rib_start=float(rng.uniform(-0.86, -0.78)),
        rib_spacing=float(rng.uniform(0.125, 0.145)),
        marking_angles=tuple(float(a) for a in np.sort(rng.uniform(-1.45, 1.45, size=8))),
        gastric_bubble=bool(rng.random() < 0.7),
    )


# ---------------------------------------------------------------------------------- soft masks
def soft_inside(signed_distance: np.ndarray, px: float) -> np.ndarray:
    """1 inside (negative distance), 0 outside, with an anti-aliased edge about one pixel wide."""
    return np.clip(0.5 - signed_distance / (2.0 * px), 0.0, 1.0)


def ellipse_distance(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float,
                     power: float = 2.0) -> np.ndarray:
    """Approximate signed distance to a superellipse (exact enough for ~1 px soft edges)."""
    u, v = (x - cx) / rx, (y - cy) / ry
    if power == 2.0:  # the common case, without fractional powers
        return (np.sqrt(u * u + v * v) - 1.0) * min(rx, ry)
    f = np.abs(u) ** power + np.abs(v) ** power
    return (f ** (1.0 / power) - 1.0) * min(rx, ry)


def segment_distance(x: np.ndarray, y: np.ndarray, p0: tuple[float, float],
                     p1: tuple[float, float]) -> np.ndarray:
    """Distance of every grid point to the segment p0-p1."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip(((x - p0[0]) * dx + (y - p0[1]) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.hypot(x - p0[0] - t * dx, y - p0[1] - t * dy)


# ------------------------------------------------------------------------------------- shapes
def diaphragm_y(anat: Anatomy, side: str, x: np.ndarray) -> np.ndarray:
    """Height of one hemidiaphragm under each x: a dome highest over the lung's centre."""
    s = SIDE_SIGN[side]
    u = (x - s * anat.lung_center_x) * s / anat.lung_half_width  # > 0 towards the chest wall
    # Steep laterally into the costophrenic sulcus, shallow medially towards the heart.
    return anat.dome_y(side) + anat.dome_drop * u * u * np.where(u > 0, 1.0, 0.35)


def lung_shape(anat: Anatomy, side: str, x: np.ndarray, y: np.ndarray, px: float,
               shrink: float = 0.0) -> np.ndarray:
    """The pleural cavity of one lung above the diaphragm (heart not removed).

    ``shrink`` > 0 gives the lung collapsed towards the hilum/base by that fraction (used for
    pneumothorax): the lung scales about the medial end of its base.
    """
    s = SIDE_SIGN[side]
    rx, ry = anat.lung_half_width, anat.lung_half_height
    cx, cy = s * anat.lung_center_x, anat.lung_center_y
    if shrink > 0.0:
        ax, ay = s * (anat.lung_center_x - anat.lung_half_width), anat.dome_y(side)
        k = 1.0 - shrink
        cx, cy, rx, ry = ax + (cx - ax) * k, ay + (cy - ay) * k, rx * k, ry * k
    cavity = soft_inside(ellipse_distance(x, y, cx, cy, rx, ry, power=2.2), px)
    above_diaphragm = soft_inside(y - diaphragm_y(anat, side, x), px)
    same_half = soft_inside(-s * x, px)  # never cross the midline
    return cavity * above_diaphragm * same_half


def heart_half_width(anat: Anatomy, ctr: float) -> float:
    return ctr * anat.thorax_half_width


def heart_mask(anat: Anatomy, x: np.ndarray, y: np.ndarray, px: float, ctr: float) -> np.ndarray:
    """Cardiac silhouette with cardiothoracic ratio ``ctr``; two thirds of it lie left of midline."""
    hw = heart_half_width(anat, ctr)
    # A bigger heart is also a little taller; its base stays on the diaphragm.
    hh = anat.heart_half_height * (ctr / anat.heart_ctr) ** 0.35
    cx = SIDE_SIGN["left"] * 0.35 * hw
    cy = anat.dome_left + 0.14 - hh
    return soft_inside(ellipse_distance(x, y, cx, cy, hw, hh, power=2.0), px)


def heart_top(anat: Anatomy) -> float:
    """y of the top of a normal heart (the base of the great vessels)."""
    return anat.dome_left + 0.14 - 2.0 * anat.heart_half_height


def carina_y(anat: Anatomy) -> float:
    """y of the tracheal carina, a little above the aortic knob; device tips are placed from it."""
    return heart_top(anat) - 0.14


CM = 0.05  # one centimetre in normalised units (the inner thorax is ~30 cm across)


def spine_mask(x: np.ndarray, y: np.ndarray, px: float, center: np.ndarray | float = 0.0) -> np.ndarray:
    """Vertebral column around ``center`` (x of the spine's axis at each y), with end plates."""
    return soft_inside(np.abs(x - center) - 0.065, px) * (0.8 + 0.2 * np.cos(2 * np.pi * y / 0.13))


def rib_center_y(anat: Anatomy, k: int, x: np.ndarray | float) -> np.ndarray | float:
    """y of the centre line of posterior rib ``k`` (0 = highest drawn) at x (see ``_ribs``)."""
    u = np.abs(x) / anat.thorax_half_width
    return anat.rib_start + k * anat.rib_spacing - 0.06 * u + 0.42 * u * u


def rib_half_thickness(anat: Anatomy, x: np.ndarray | float) -> np.ndarray | float:
    return 0.024 + 0.010 * np.abs(x) / anat.thorax_half_width


def _mediastinum(anat: Anatomy, x: np.ndarray, y: np.ndarray, px: float) -> np.ndarray:
    top = heart_top(anat)
    half_width = 0.11 + 0.05 * np.clip((y - anat.lung_top) / (top - anat.lung_top), 0.0, 1.0)
    band = soft_inside(np.abs(x - 0.01) - half_width, px)
    knob = soft_inside(ellipse_distance(x, y, 0.14, top - 0.04, 0.075, 0.065), px)
    return np.maximum(band, knob)


def _ribs(anat: Anatomy, x: np.ndarray, y: np.ndarray, px: float) -> np.ndarray:
    """Posterior ribs: arcs leaving the spine, rising a little, then curving down laterally."""
    u = np.abs(x) / anat.thorax_half_width
    # Ribs are parallel copies of one arc: find the nearest rib of each point, then its band.
    offset = y + 0.06 * u - 0.42 * u * u - anat.rib_start
    nearest = np.clip(np.round(offset / anat.rib_spacing), 0, 9)
    thickness = rib_half_thickness(anat, x)  # ribs widen laterally
    band = np.exp(-(((offset - nearest * anat.rib_spacing) / thickness) ** 4))
    return band * soft_inside(u - 1.08, px) * soft_inside(0.05 - np.abs(x), px)


def _clavicles(anat: Anatomy, x: np.ndarray, y: np.ndarray, px: float, lift: float = 0.0) -> np.ndarray:
    """Clavicles; ``lift`` > 0 raises their lateral ends (the lordotic look of AP films)."""
    out = np.zeros_like(x)
    for s in (-1.0, 1.0):
        p0 = (s * 0.07, anat.lung_top + 0.02 - 0.3 * lift)
        p1 = (s * (anat.thorax_half_width + 0.05), anat.lung_top - 0.13 - lift)
        out = np.maximum(out, soft_inside(segment_distance(x, y, p0, p1) - 0.035, px))
    return out


def _markings(anat: Anatomy, side: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Vessels radiating from the hilum, thinning and fading towards the periphery."""
    s = SIDE_SIGN[side]
    hx = s * (anat.lung_center_x - 0.55 * anat.lung_half_width)
    hy = anat.lung_center_y - 0.45 * anat.lung_half_height
    ang = np.asarray(anat.marking_angles).reshape(-1, *([1] * x.ndim))
    dx, dy = s * np.cos(ang), np.sin(ang)
    rx, ry = x - hx, y - hy
    along = np.maximum(rx * dx + ry * dy, 0.0)
    across = np.hypot(rx - along * dx, ry - along * dy)
    width = 0.008 + 0.028 / (1.0 + along / 0.6)  # vessels taper away from the hilum
    # max over vessels of exp(-a) * exp(-b) is exp(-min(a + b)): one exp instead of one per vessel.
    return np.exp(-((across / width) ** 2 + along / 0.45).min(axis=0))


# --------------------------------------------------------------------------------- composition
@dataclass
class AnatomyLayers:
    """What the finding renderers need: base attenuation, markings and the visible lungs."""

    density: np.ndarray  # attenuation without lung markings
    markings: np.ndarray  # vessel pattern, added at the end through ``marking_weight``
    lungs: dict[str, np.ndarray]  # visible (aerated) lung per side, heart removed
    heart: np.ndarray


def render_anatomy(anat: Anatomy, x: np.ndarray, y: np.ndarray, px: float, ctr: float,
                   clavicle_lift: float = 0.0) -> AnatomyLayers:
    """Attenuation of a normal chest with heart size ``ctr`` on the (anatomical) grid x, y."""
    body = soft_inside(ellipse_distance(x, y, 0.0, 0.25, anat.body_half_width, 1.45, power=4.0), px)
    heart = heart_mask(anat, x, y, px, ctr)
    mediastinum = _mediastinum(anat, x, y, px)
    central = np.maximum(heart, mediastinum)
    lungs = {side: lung_shape(anat, side, x, y, px) * (1.0 - central) for side in SIDE_SIGN}
    diaphragm = np.where(x < 0, diaphragm_y(anat, "right", x), diaphragm_y(anat, "left", x))
    abdomen = body * soft_inside(diaphragm - y, px)
    spine = spine_mask(x, y, px)

    density = TISSUE * body
    density = density + np.maximum.reduce([0.16 * heart, 0.14 * mediastinum, 0.10 * abdomen])
    for side in SIDE_SIGN:
        density = density - LUNG_AIR * lungs[side]
    if anat.gastric_bubble:
        bubble = soft_inside(ellipse_distance(x, y, 0.38, anat.dome_left + 0.13, 0.09, 0.05), px)
        density = density - 0.2 * bubble * abdomen
    # Ribs are faint behind the dense mediastinum, as on a well-penetrated film.
    density = density + SPINE * spine * body + RIB * _ribs(anat, x, y, px) * body * (1.0 - 0.7 * central)
    density = density + 0.14 * _clavicles(anat, x, y, px, clavicle_lift) * body
    markings = np.zeros_like(x)
    for side, half in (("right", x < 0), ("left", x >= 0)):  # each side's vessels on its half only
        markings[half] = MARKING_AMPLITUDE * _markings(anat, side, x[half], y[half])
    return AnatomyLayers(density=density, markings=markings, lungs=lungs, heart=heart)
