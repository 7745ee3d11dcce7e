"""Dense targets that travel with a prepared image: boxes rescaled, masks resized and encoded.

A preparer gives boxes and masks in the pixels of the *original* image; the pipeline resizes
the image once, so the targets must follow it exactly. This module holds that step:

* **Boxes**: ``meta["findings"]`` records (``name``, ``bbox`` ``[x0, y0, x1, y1)`` in original
  pixel columns / rows, the SynthCXR convention read by :mod:`medvlp.eval.detection`) are
  rescaled to the stored image (x by new_w / w, y by new_h / h); the original box is kept as
  ``bbox_orig``.
* **Masks**: ``RawRecord.mask`` is a picklable callable ``(height, width) -> uint16 array`` in
  the SynthCXR class-bit convention (bit ``k`` set where ``CLASSES[k]`` is present; docs/
  synthcxr.md "masks"). It is evaluated in the worker at the original size, resized per bit
  (bilinear, i.e. area-weighted when shrinking, then >= 0.5) to the image's new size, and
  stored as a 16-bit PNG shard member ``<key>.mask.png``; ``meta["mask"]`` names that member.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np

from medvlp.errors import DataError


def resized_hw(height: int, width: int, size: int) -> tuple[int, int]:
    """The stored image's (height, width): longest side -> ``size``, aspect kept, never upscaled."""
    if max(height, width) <= size:
        return height, width
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def scale_findings(findings: list[dict], orig_hw: tuple[int, int], new_hw: tuple[int, int]) -> list[dict]:
    """Findings with ``bbox`` rescaled from the original to the resized image (2 decimals)."""
    sy, sx = new_hw[0] / orig_hw[0], new_hw[1] / orig_hw[1]
    out = []
    for f in findings:
        f = dict(f)
        box = f.get("bbox")
        if box is not None:
            b = np.asarray(box, dtype=np.float64).reshape(4)
            f["bbox_orig"] = [float(v) for v in b]
            f["bbox"] = [round(float(v), 2) for v in b * np.array([sx, sy, sx, sy])]
        out.append(f)
    return out


def resize_mask(mask: np.ndarray, new_hw: tuple[int, int]) -> np.ndarray:
    """A uint16 class-bit mask resized bit by bit (each bit: bilinear on 0/255, kept where >= 128)."""
    from PIL import Image

    if mask.shape == tuple(new_hw):
        return mask.astype(np.uint16)
    out = np.zeros(new_hw, dtype=np.uint16)
    present = np.bitwise_or.reduce(mask.ravel()) if mask.size else 0
    for bit in range(16):
        if not (int(present) >> bit) & 1:
            continue
        plane = Image.fromarray((((mask >> bit) & 1) * 255).astype(np.uint8))
        small = np.asarray(plane.resize((new_hw[1], new_hw[0]), Image.Resampling.BILINEAR))
        out |= (small >= 128).astype(np.uint16) << bit
    return out


def encode_mask(mask: np.ndarray) -> bytes:
    """16-bit grayscale PNG bytes of a class-bit mask (as SynthCXR writes them)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint16)).save(buf, "PNG", compress_level=6)
    return buf.getvalue()


def apply_targets(rec: Any, meta: dict, orig_hw: tuple[int, int], size: int, key: str) -> dict[str, bytes]:
    """Rescale ``meta["findings"]`` boxes in place and render the record's mask.

    Returns the extra shard members (``{"mask.png": bytes}`` or ``{}``); a mask that cannot be
    rendered raises :class:`DataError` naming the record (the pipeline quarantines it).
    """
    new_hw = resized_hw(orig_hw[0], orig_hw[1], size)
    if isinstance(meta.get("findings"), list):
        meta["findings"] = scale_findings(meta["findings"], orig_hw, new_hw)
    if getattr(rec, "mask", None) is None:
        return {}
    try:
        mask = np.asarray(rec.mask(*orig_hw))
    except (ValueError, IndexError) as exc:
        raise DataError(f"{rec.id}: cannot build the mask at {orig_hw[0]}x{orig_hw[1]} ({exc})") from None
    if mask.shape != tuple(orig_hw):
        raise DataError(f"{rec.id}: mask shape {mask.shape} differs from the image's {tuple(orig_hw)}")
    meta["mask"] = f"{key}.mask.png"
    return {"mask.png": encode_mask(resize_mask(mask, new_hw))}
