"""SIIM-ACR preparer: the RLE convention on a hand-computed mask, a tiny Kaggle-layout fixture
through the whole pipeline (mask members, quarantine, privacy), and the real train-rle.csv."""
from __future__ import annotations

import gzip
import zipfile

import numpy as np
import pytest

from medvlp.data.prepare import prepare
from medvlp.data.prepare.siim import (
    SiimAcrPreparer,
    decode_siim_rle,
    encode_siim_rle,
    parse_siim_rle_csv,
)
from medvlp.data.prepare.targets import resize_mask
from medvlp.errors import ConfigError
from tests.prepare_helpers import (
    manifest_rows,
    png_array,
    quarantine,
    shard_members,
    write_dicom,
)

pytest.importorskip("pydicom")
BIT = 8  # CLASSES.index("Pneumothorax")


def test_rle_hand_computed_column_major_relative():
    # height 4, width 3. "1 2 3 1": run at flat 1..2, then 3 pixels after its end (flat 3) -> flat 6.
    # Column-major: flat p is (row p % 4, column p // 4): 1 -> (1, 0), 2 -> (2, 0), 6 -> (2, 1).
    expected = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=bool)
    assert np.array_equal(decode_siim_rle("1 2 3 1", 4, 3), expected)
    assert encode_siim_rle(expected) == "1 2 3 1"
    assert not decode_siim_rle("-1", 4, 3).any() and not decode_siim_rle(" -1", 4, 3).any()
    rng = np.random.default_rng(0)
    m = rng.random((9, 7)) > 0.6
    assert np.array_equal(decode_siim_rle(encode_siim_rle(m), 9, 7), m)
    for bad in ("1 2 3", "5 -1", "10 5"):  # odd count, negative, past the 12-pixel image
        with pytest.raises(ValueError):
            decode_siim_rle(bad, 4, 3)


def _fixture(root):
    h, w = 64, 48
    inst1 = np.zeros((h, w), bool)
    inst1[8:40, 4:20] = True
    inst2 = np.zeros((h, w), bool)
    inst2[40:60, 30:44] = True
    rows = ["ImageId, EncodedPixels"]
    uids = ["1.2.276.0.1.1", "1.2.276.0.1.2", "1.2.276.0.1.3", "1.2.276.0.1.4"]
    for n, uid in enumerate(uids[:3]):
        img = np.random.default_rng(n).integers(0, 255, (h, w)).astype(np.uint8)
        study = f"1.2.276.0.2.{n}"
        write_dicom(root / "dicom-images-train" / study / f"1.2.276.0.3.{n}" / f"{uid}.dcm", img,
                    patient_id=f"PID-SECRET-{n}", study_uid=study, name="Secret^Person")
    rows += [f"{uids[0]}, {encode_siim_rle(inst1)}", f"{uids[0]}, {encode_siim_rle(inst2)}",
             f"{uids[1]}, -1", f"{uids[2]}, 5 3 2",  # malformed: odd count
             f"{uids[3]}, -1"]  # no DICOM on disk
    (root / "train-rle.csv").write_text("\n".join(rows) + "\n")
    return uids, inst1 | inst2


def test_siim_pipeline_writes_class_bit_masks(tmp_path):
    from medvlp.eval.localization import _read_masks

    uids, union = _fixture(tmp_path / "raw")
    out = tmp_path / "out"
    res = prepare("siim-acr", tmp_path / "raw", out, image_size=32, shard_size=2, progress=False, key="k" * 16)
    assert res.rows == 2 and res.quarantine_reasons == {"bad_target": 1, "missing_file": 1}
    q = quarantine(out)
    assert "malformed RLE" in q[uids[2]]["detail"] and q[uids[3]]["reason"] == "missing_file"
    rows = manifest_rows(out)
    pos, neg = rows[uids[0]], rows[uids[1]]
    assert pos["labels"] == {"Pneumothorax": 1} and neg["labels"] == {"Pneumothorax": 0}
    assert pos["meta"]["instances"] == 2 and pos["subject_id"].startswith("s-")
    members = shard_members(out)
    key = pos["meta"]["key"]
    assert pos["meta"]["mask"] == f"{key}.mask.png" and set(members[key]) == {"png", "json", "mask.png"}
    mask = png_array(members[key]["mask.png"])
    image = png_array(members[key]["png"])
    assert mask.shape == image.shape == (32, 24) and mask.dtype == np.uint16
    assert set(np.unique(mask)) == {0, 1 << BIT}
    assert np.array_equal(mask, resize_mask(union.astype(np.uint16) << BIT, (32, 24)))
    assert abs((mask > 0).mean() - union.mean()) < 0.02  # area kept through the resize
    assert not png_array(members[neg["meta"]["key"]]["mask.png"]).any()
    # the segmentation task's reader decodes the member as the Pneumothorax plane
    path = tmp_path / "m.png"
    path.write_bytes(members[key]["mask.png"])
    assert np.array_equal(_read_masks(path, [BIT])[0], mask > 0)
    blob = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert b"PID-SECRET" not in blob and b"Secret" not in blob


def test_siim_needs_key_and_layout(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDVLP_SUBJECT_KEY", raising=False)
    with pytest.raises(ConfigError, match="train-rle.csv"):
        SiimAcrPreparer(tmp_path)
    _fixture(tmp_path / "raw")
    with pytest.raises(ConfigError, match="subject-key"):
        prepare("siim-acr", tmp_path / "raw", tmp_path / "out", progress=False)


def test_real_siim_train_rle_csv(iu_wheel, tmp_path):
    """torchxrayvision ships the real SIIM train-rle.csv: parse it and decode real masks."""
    with zipfile.ZipFile(iu_wheel) as zf:
        data = zf.read("torchxrayvision/data/siim-pneumothorax-train-rle.csv.gz")
    path = tmp_path / "train-rle.csv.gz"
    path.write_bytes(data)
    masks = parse_siim_rle_csv(path)
    lines = gzip.decompress(data).decode().splitlines()
    assert lines[0] == "ImageId, EncodedPixels" and sum(map(len, masks.values())) == len(lines) - 1 == 12954
    positive = {k: [r for r in v if r != "-1"] for k, v in masks.items() if any(r != "-1" for r in v)}
    assert len(masks) == 12047 and len(positive) == 2669
    assert max(len(v) for v in positive.values()) == 10  # several pneumothoraces on some images
    for uid in sorted(positive)[:8]:
        for rle in positive[uid]:
            m = decode_siim_rle(rle, 1024, 1024)
            assert m.sum() == sum(int(v) for v in rle.split()[1::2])  # runs are disjoint
            assert encode_siim_rle(m) == " ".join(rle.split())  # canonical: decode/encode round-trips


def test_siim_worker_pool_gives_same_bytes(tmp_path):
    _fixture(tmp_path / "raw")
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        prepare("siim-acr", tmp_path / "raw", out, image_size=32, workers=workers, progress=False, key="k" * 16)
        outs.append({p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert outs[0] == outs[1] and any(k.endswith(".tar") for k in outs[0])
