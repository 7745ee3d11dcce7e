"""Small writers and readers shared by the dataset preparer tests (fixtures are built by the tests)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, shape=(40, 60), seed: int = 0, rgb: bool = False) -> np.ndarray:
    """A random 8-bit image (PNG or JPG by suffix); returns its pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (*shape, 3) if rgb else shape).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def write_dicom(path: Path, arr: np.ndarray, patient_id: str = "anon", study_uid: str = "1.2.3",
                name: str = "Anon^Anon", bits_stored: int | None = None) -> None:
    """A MONOCHROME2 DICOM (8- or 16-bit allocated by ``arr.dtype``) written with pydicom."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.PatientName, ds.PatientID, ds.StudyInstanceUID = name, patient_id, study_uid
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ViewPosition, ds.PhotometricInterpretation = "CR", "PA", "MONOCHROME2"
    allocated = 8 if arr.dtype == np.uint8 else 16
    stored = bits_stored or allocated
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (
        1, allocated, stored, stored - 1, 0)
    ds.PixelData = arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def shard_members(out: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} over every shard of a prepare output."""
    found: dict[str, dict[str, bytes]] = {}
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                found.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return found


def png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def manifest_rows(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


def quarantine(out: Path) -> dict[str, dict]:
    text = (out / "quarantine.jsonl").read_text()
    return {q["id"]: q for q in map(json.loads, text.splitlines())}
