"""Medical image reading: DICOM, PNG (8/16-bit), JPG and NIfTI slices -> one numpy array.

:func:`read_image` returns the pixels; :func:`read_image_with_info` also returns an
:class:`ImageInfo` of technical metadata (format, bit depth, frame, the intensity range that
was mapped to [0, 1], pixel spacing and an allow-list of technical DICOM tags). Patient
identifiers never enter it: :func:`dicom_metadata` copies only :data:`TECHNICAL_TAGS`.

Intensity rules (docs/data/images.md has the full table):

* Every format is first brought to values in its own units (DICOM: after the Modality LUT /
  RescaleSlope+Intercept; PNG/JPG: stored values; NIfTI: after scl_slope/scl_inter).
* A range (low, high) is chosen: ``window="auto"`` uses the file's own VOI LUT or
  WindowCenter/Width for DICOM (applied with pydicom), else the bit-depth range for PNG/JPG
  (0..255 or 0..65535) and the data's min..max for DICOM without a window and NIfTI volumes;
  ``window="minmax"`` ignores the file's window and takes the image's own min..max;
  ``window=(center, width)`` is an explicit linear window [center - width/2, center + width/2].
* float output = clip((value - low) / (high - low), 0, 1); MONOCHROME1 is then inverted
  (1 - x) so that bright always means dense; uint8 / uint16 = round(float * 255 / 65535).
* Channels: grayscale gives (H, W), colour (RGB, YBR converted to RGB, PALETTE COLOR through
  its lookup table) gives (H, W, 3). ``channels="gray"`` turns colour into luminance
  (ITU-R BT.601 weights), ``channels="rgb"`` repeats grayscale three times.

pydicom and nibabel are optional (``pip install "medvlp[dicom]"`` / ``"medvlp[nifti]"``);
compressed DICOM transfer syntaxes need optional decoders, named in the error when missing.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medvlp.errors import DataError

# Technical DICOM attributes kept as metadata. Nothing that names, dates or locates a patient
# or a study (PatientName, PatientID, dates, accession numbers, institution) is ever copied.
TECHNICAL_TAGS = (
    "Modality", "ViewPosition", "PhotometricInterpretation", "Rows", "Columns", "SamplesPerPixel",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "NumberOfFrames",
    "PixelSpacing", "ImagerPixelSpacing", "SliceThickness", "SpacingBetweenSlices",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth",
    "VOILUTFunction", "BodyPartExamined", "PatientOrientation", "ImageLaterality", "Laterality",
    "PresentationIntentType", "Manufacturer", "ManufacturerModelName", "KVP", "Exposure",
)
SUFFIXES = {".dcm": "dicom", ".dicom": "dicom", ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg",
            ".nii": "nifti", ".nii.gz": "nifti"}
OUT_KINDS = ("float", "uint8", "uint16")

# Transfer syntax UID prefix -> pip command installing a pydicom decoder for it.
_JPEG = "pip install pylibjpeg pylibjpeg-libjpeg  (or: pip install python-gdcm)"
_DECODERS = {
    "1.2.840.10008.1.2.4.50": _JPEG, "1.2.840.10008.1.2.4.51": _JPEG,
    "1.2.840.10008.1.2.4.57": _JPEG, "1.2.840.10008.1.2.4.70": _JPEG,
    "1.2.840.10008.1.2.4.80": "pip install pyjpegls  (or: pip install pylibjpeg pylibjpeg-libjpeg)",
    "1.2.840.10008.1.2.4.81": "pip install pyjpegls  (or: pip install pylibjpeg pylibjpeg-libjpeg)",
    "1.2.840.10008.1.2.4.90": "pip install pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pip install pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pip install pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pip install pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pip install pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pip install pylibjpeg pylibjpeg-rle",
}


@dataclass(frozen=True)
class ImageInfo:
    """Technical facts about one read image (never patient identifiers).

    ``value_range``: the (low, high) interval, in the file's units after the Modality LUT /
    NIfTI scaling, that was mapped to [0, 1]; ``inverted``: MONOCHROME1 was flipped.
    ``spacing``: (row, column) pixel size in mm when the file states it.
    """

    path: str
    format: str
    shape: tuple[int, ...]
    bits: int
    n_frames: int
    frame: int | None
    photometric: str
    value_range: tuple[float, float]
    inverted: bool = False
    spacing: tuple[float, float] | None = None
    tags: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Raw:
    """A reader's result before intensity mapping: values in file units + the auto range."""

    values: np.ndarray
    low: float
    high: float
    bits: int
    photometric: str
    n_frames: int = 1
    frame: int | None = None
    invert: bool = False
    spacing: tuple[float, float] | None = None
    tags: dict[str, Any] = field(default_factory=dict)


def read_image(path: str | Path, *, frame: int | None = None, axis: int = 2, out: str = "float",
               window: str | tuple[float, float] = "auto", channels: str = "keep") -> np.ndarray:
    """Pixels of a DICOM / PNG / JPG / NIfTI file as (H, W) or (H, W, 3); see the module rules.

    ``frame``: frame of a multi-frame DICOM or slice of a NIfTI volume along ``axis``
    (default: the middle one; negative counts from the end). ``out``: "float" (float32 in
    [0, 1]), "uint8" or "uint16". Raises :class:`DataError` naming the file and the fix.
    """
    return read_image_with_info(path, frame=frame, axis=axis, out=out, window=window, channels=channels)[0]


def read_image_with_info(path: str | Path, *, frame: int | None = None, axis: int = 2, out: str = "float",
                         window: str | tuple[float, float] = "auto",
                         channels: str = "keep") -> tuple[np.ndarray, ImageInfo]:
    """:func:`read_image` plus its :class:`ImageInfo`."""
    path = Path(path)
    if out not in OUT_KINDS:
        raise DataError(f"read_image(out={out!r}) for {path}: use one of {', '.join(OUT_KINDS)}.")
    if channels not in ("keep", "gray", "rgb"):
        raise DataError(f"read_image(channels={channels!r}) for {path}: use 'keep', 'gray' or 'rgb'.")
    explicit = _parse_window(window, path)
    if not path.is_file():
        raise DataError(f"image file {path} does not exist (or is not a file); check the path or the "
                        "manifest row that points to it.")
    kind = detect_format(path)
    if kind == "dicom":
        raw = _read_dicom(path, frame, use_file_window=window == "auto")
    elif kind == "nifti":
        raw = _read_nifti(path, frame, axis)
    else:
        raw = _read_pil(path, frame)
    low, high = raw.low, raw.high
    if explicit is not None:
        low, high = explicit
    elif window == "minmax" or not np.isfinite([low, high]).all():
        low, high = float(np.nanmin(raw.values)), float(np.nanmax(raw.values))
    top = {"uint8": 255, "uint16": 65535}.get(out)
    if (top is not None and raw.values.dtype == out and (low, high) == (0, top) and not raw.invert
            and _channels(raw.values[:1, :1], channels).ndim == raw.values.ndim):
        arr = np.require(raw.values, requirements="W")  # e.g. 8-bit JPG to uint8: stored values, untouched
    else:
        x = _to_unit(raw.values, low, high)
        if raw.invert:
            np.subtract(1.0, x, out=x)
        x = _channels(x, channels).astype(np.float32, copy=False)
        arr = x if top is None else np.rint(np.multiply(x, top, out=x), out=x).astype(out)
    info = ImageInfo(path=str(path), format=kind, shape=tuple(arr.shape), bits=raw.bits, n_frames=raw.n_frames,
                     frame=raw.frame, photometric=raw.photometric, value_range=(float(low), float(high)),
                     inverted=raw.invert, spacing=raw.spacing, tags=raw.tags)
    return arr, info


def detect_format(path: str | Path) -> str:
    """"dicom" / "png" / "jpeg" / "nifti" from the suffix, else from the file's first bytes."""
    path = Path(path)
    name = path.name.lower()
    for suffix, kind in sorted(SUFFIXES.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(suffix):
            return kind
    with open(path, "rb") as fh:
        head = fh.read(352)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[128:132] == b"DICM":  # extension-less DICOM files are common in PACS exports
        return "dicom"
    if head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    raise DataError(f"{path}: unsupported image type '{path.suffix or '(no extension)'}' and the content is "
                    f"not recognised; supported: {', '.join(sorted(SUFFIXES))} (or extension-less DICOM). "
                    "Convert the file or remove it from the list.")


def dicom_metadata(ds: Any) -> dict[str, Any]:
    """The allow-listed technical tags of a pydicom Dataset as plain JSON-friendly values."""
    meta = {}
    for key in TECHNICAL_TAGS:
        value = ds.get(key)
        if value is not None and value != "":
            meta[key] = _plain(value)
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None and "TransferSyntaxUID" in file_meta:
        meta["TransferSyntaxUID"] = str(file_meta.TransferSyntaxUID)
    return meta


# -- intensity helpers ---------------------------------------------------------------------------
def _parse_window(window: Any, path: Path) -> tuple[float, float] | None:
    if isinstance(window, str) and window in ("auto", "minmax"):
        return None
    try:
        center, width = (float(v) for v in window)
    except (TypeError, ValueError):
        center, width = 0.0, -1.0
    if not width > 0:
        raise DataError(f"read_image(window={window!r}) for {path}: use 'auto', 'minmax' or a "
                        "(center, width) pair with width > 0, e.g. (40, 400) for a CT soft-tissue window.")
    return center - width / 2, center + width / 2


def _to_unit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """float32 clip((values - low) / (high - low), 0, 1); float32 holds 16-bit levels exactly."""
    if not high > low:  # a constant image: nothing to stretch
        return np.zeros(values.shape, dtype=np.float32)
    x = np.subtract(values, low, dtype=np.float32)
    x *= np.float32(1.0 / (high - low))
    return np.clip(x, 0.0, 1.0, out=x)


def _channels(x: np.ndarray, rule: str) -> np.ndarray:
    if rule == "gray" and x.ndim == 3:
        return x @ np.array([0.299, 0.587, 0.114], dtype=x.dtype)
    if rule == "rgb" and x.ndim == 2:
        return np.repeat(x[..., None], 3, axis=-1)
    return x


def _frame_index(frame: int | None, n: int, path: Path, what: str = "frame") -> int:
    idx = n // 2 if frame is None else int(frame)
    if not -n <= idx < n:
        raise DataError(f"{path}: {what} index {frame} is out of range; the file has {n} {what}s "
                        f"(use 0..{n - 1}, a negative index from the end, or None for the middle one).")
    return idx % n


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_plain(v) for v in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


def _require(module: str, extra: str, path: Path):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DataError(f"reading {path} needs the optional package {module}: "
                        f"pip install \"medvlp[{extra}]\" (or pip install {module}).") from exc


# -- DICOM ---------------------------------------------------------------------------------------
def _read_dicom(path: Path, frame: int | None, use_file_window: bool) -> _Raw:
    pydicom = _require("pydicom", "dicom", path)
    from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array

    try:
        ds = pydicom.dcmread(path)
    except pydicom.errors.InvalidDicomError:
        ds = _read_dicom_forced(pydicom, path)
    except (OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: unreadable DICOM ({exc}); the file is probably truncated or corrupt, "
                        "re-export or re-download it.") from exc
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DataError(f"{path}: DICOM without pixel data (no PixelData element; Modality "
                        f"{ds.get('Modality', '?')}, e.g. a structured report or presentation state). "
                        "Remove it from the image list.")
    n_frames = int(ds.get("NumberOfFrames") or 1)
    idx = _frame_index(frame, n_frames, path)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    try:
        # raw=False: pydicom converts YBR_* to RGB (convert_color_space) unless the decoder did
        arr = pixel_array(ds, index=idx if n_frames > 1 else None, raw=False)
    except (RuntimeError, NotImplementedError) as exc:
        raise _decoder_error(path, ds, exc) from exc
    except (ValueError, AttributeError, KeyError, TypeError, EOFError, OSError) as exc:
        raise DataError(f"{path}: the DICOM pixel data cannot be decoded ({exc}); the file is probably "
                        "truncated or its image attributes (Rows, Columns, BitsAllocated) are wrong. "
                        "Re-export it or remove it from the list.") from exc
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    common = {"n_frames": n_frames, "frame": idx if n_frames > 1 else None, "tags": dicom_metadata(ds),
              "spacing": (float(spacing[0]), float(spacing[1])) if spacing and len(spacing) == 2 else None}
    bits = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        lut_bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return _Raw(rgb, 0.0, 2.0**lut_bits - 1, lut_bits, "RGB", **common)
    if arr.ndim == 3:  # RGB, or YBR already converted to RGB above
        return _Raw(arr, 0.0, 2.0**bits - 1, bits, "RGB", **common)
    values = apply_modality_lut(arr, ds)
    low, high = np.nan, np.nan  # nan -> min..max of the values
    if use_file_window and (ds.get("VOILUTSequence") or "WindowCenter" in ds):
        values, low, high = _apply_file_voi(values, ds)
    return _Raw(values, low, high, bits, photometric, invert=photometric == "MONOCHROME1", **common)


def _read_dicom_forced(pydicom: Any, path: Path) -> Any:
    """Old DICOM files lack the 128-byte preamble; accept them only if they hold pixel data."""
    try:
        ds = pydicom.dcmread(path, force=True)
        ok = "PixelData" in ds and "Rows" in ds
    except Exception:  # noqa: BLE001 - any parse failure means "not DICOM" here
        ok = False
    if not ok:
        raise DataError(f"{path}: not a DICOM file (no 'DICM' header and no readable image attributes); "
                        "check the file type or remove it from the list.")
    if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta = ds.file_meta if getattr(ds, "file_meta", None) else pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian  # the default of old files
    return ds


def _apply_file_voi(values: np.ndarray, ds: Any) -> tuple[np.ndarray, float, float]:
    """The file's VOI LUT / window through pydicom, and the output interval it maps onto."""
    from pydicom.pixels import apply_voi_lut

    if ds.get("VOILUTSequence"):
        # LUT input must be integer; the interval is the LUT's first and last entry
        item = ds.VOILUTSequence[0]
        first = int(item.LUTDescriptor[1])
        probe = np.array([first, first + (int(item.LUTDescriptor[0]) or 2**16) - 1], dtype=np.int64)
        values = np.rint(values).astype(np.int64)
    else:  # windowing: probe far outside the window to read back its [y_min, y_max]
        probe = np.array([-1e30, 1e30])
    with np.errstate(over="ignore"):
        ends = apply_voi_lut(probe, ds).astype(np.float64)
        out = apply_voi_lut(values, ds)
    return out, float(ends.min()), float(ends.max())


def _decoder_error(path: Path, ds: Any, exc: Exception) -> DataError:
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    uid = str(ts or "unknown")
    name = f"{ts.name} ({uid})" if ts is not None and ts.name != uid else uid
    fix = _DECODERS.get(uid)
    if fix is None:
        return DataError(f"{path}: unsupported DICOM transfer syntax {name}; no pydicom decoder "
                         f"handles it ({str(exc).splitlines()[0]}). Convert the file to an uncompressed "
                         "syntax (e.g. `gdcmconv --raw IN OUT` or `dcmdjpeg IN OUT`) or remove it.")
    return DataError(f"{path}: pixel data compressed with {name} and no installed decoder can read it "
                     f"({' '.join(str(exc).split())[:300]}). Fix: {fix}, or pip install \"medvlp[dicom-codecs]\".")


# -- PNG / JPG -----------------------------------------------------------------------------------
def _read_pil(path: Path, frame: int | None) -> _Raw:
    from PIL import Image, ImageOps, UnidentifiedImageError

    _frame_index(frame, 1, path)
    try:
        with Image.open(path) as im:
            im.load()  # decodes now, so a truncated file fails here rather than later
            ImageOps.exif_transpose(im, in_place=True)  # as viewers show it; no copy when upright
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale PNG: keep every level
                arr, bits, photometric = np.array(im), 16, "MONOCHROME2"
            elif mode in ("1", "L", "LA", "I;8"):
                arr, bits, photometric = np.asarray(im if mode == "L" else im.convert("L")), 8, "MONOCHROME2"
            else:  # RGB(A), palette, CMYK, YCbCr: alpha dropped, not composited
                arr, bits, photometric = np.asarray(im if mode == "RGB" else im.convert("RGB")), 8, "RGB"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: corrupt or truncated image ({exc}); re-download or re-export it, or remove "
                        "it from the list.") from exc
    return _Raw(arr, 0.0, 2.0**bits - 1, bits, photometric)


# -- NIfTI ---------------------------------------------------------------------------------------
def _read_nifti(path: Path, frame: int | None, axis: int) -> _Raw:
    """A 2-D slice of the first volume in RAS+ orientation (see docs/data/images.md)."""
    nib = _require("nibabel", "nifti", path)
    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        vol = np.asanyarray(img.dataobj)  # applies scl_slope / scl_inter
    except Exception as exc:  # nibabel raises many types for bad files
        raise DataError(f"{path}: unreadable NIfTI ({type(exc).__name__}: {exc}); the file is probably "
                        "truncated or not NIfTI-1/2. Re-export it or remove it from the list.") from exc
    while vol.ndim > 3:  # 4-D (time / channels): the first volume
        vol = vol[..., 0]
    zooms = img.header.get_zooms()
    if vol.ndim == 2:
        vol, axis = vol[:, :, None], 2
    if axis not in (0, 1, 2):
        raise DataError(f"read_image(axis={axis}) for {path}: use 0 (sagittal), 1 (coronal) or 2 (axial).")
    idx = _frame_index(frame, vol.shape[axis], path, what="slice")
    a, b = (d for d in range(3) if d != axis)
    # rows: the later RAS axis with its positive end (anterior / superior) at the top
    plane = np.take(vol, idx, axis=axis).T[::-1].astype(np.float64)
    finite = vol[np.isfinite(vol)] if np.issubdtype(vol.dtype, np.floating) else vol
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    return _Raw(np.nan_to_num(plane, nan=low), low, high, int(vol.dtype.itemsize * 8), "MONOCHROME2",
                n_frames=vol.shape[axis], frame=idx, spacing=(float(zooms[b]), float(zooms[a])))
