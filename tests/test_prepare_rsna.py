"""RSNA Pneumonia preparer: a tiny Kaggle-layout fixture (boxes rescaled with the image, read by
the detection task) and the real stage_2_train_labels.csv shipped in torchxrayvision's wheel."""
from __future__ import annotations

import io
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest

from medvlp.data.prepare import prepare
from medvlp.data.prepare.rsna import RsnaPneumoniaPreparer, parse_rsna_labels
from medvlp.errors import ConfigError
from medvlp.eval.detection import sample_boxes
from tests.prepare_helpers import (
    manifest_rows,
    png_array,
    quarantine,
    shard_members,
    write_dicom,
)

pytest.importorskip("pydicom")
PIDS = ["0004cfab-14fd", "00436515-870c", "00704310-78a8", "bad-target-01"]


def _fixture(root):
    lines = ["patientId,x,y,width,height,Target",
             f"{PIDS[0]},,,,,0",
             f"{PIDS[1]},20.0,10.0,30.0,40.0,1",
             f"{PIDS[1]},70.0,12.0,20.0,44.0,1",  # two boxes on one image
             f"{PIDS[2]},8.0,60.0,16.0,20.0,1",
             f"{PIDS[3]},,,,,2"]
    (root).mkdir(parents=True)
    (root / "stage_2_train_labels.csv").write_text("\n".join(lines) + "\n")
    (root / "stage_2_detailed_class_info.csv").write_text(
        "patientId,class\n" + "\n".join(f"{p},{c}" for p, c in zip(PIDS, ["Normal", "Lung Opacity", "Lung Opacity",
                                                                          "Normal"])) + "\n")
    for n, pid in enumerate(PIDS):
        arr = np.random.default_rng(n).integers(0, 255, (100, 120)).astype(np.uint8)  # 8-bit, as RSNA ships
        write_dicom(root / "stage_2_train_images" / f"{pid}.dcm", arr, patient_id=pid)


def test_rsna_boxes_rescaled_and_readable_by_detection(tmp_path):
    _fixture(tmp_path / "raw")
    out = tmp_path / "out"
    res = prepare("rsna-pneumonia", tmp_path / "raw", out, image_size=60, progress=False)
    assert res.rows == 3 and res.quarantine_reasons == {"bad_label": 1}
    assert "Target '2'" in quarantine(out)[PIDS[3]]["detail"]
    rows = manifest_rows(out)
    two = rows[PIDS[1]]
    assert two["labels"] == {"Consolidation": 1} and rows[PIDS[0]]["labels"] == {"Consolidation": 0}
    assert rows[PIDS[0]]["meta"]["findings"] == [] and two["subject_id"] == PIDS[1]
    assert two["meta"]["rsna_class"] == "Lung Opacity" and two["meta"]["orig_size"] == [100, 120]
    # 120 x 100 -> 60 x 50: every coordinate halves; the original box is kept
    assert [f["bbox"] for f in two["meta"]["findings"]] == [[10.0, 5.0, 25.0, 25.0], [35.0, 6.0, 45.0, 28.0]]
    assert two["meta"]["findings"][0]["bbox_orig"] == [20.0, 10.0, 50.0, 50.0]
    assert {f["name"] for f in two["meta"]["findings"]} == {"Consolidation"}
    png = png_array(shard_members(out)[two["meta"]["key"]]["png"])
    assert png.shape == (50, 60)
    # the detection task reads these boxes against the stored image's size
    img = tmp_path / "stored.png"
    img.write_bytes(shard_members(out)[two["meta"]["key"]]["png"])
    boxes, cls = sample_boxes(SimpleNamespace(image=img, meta=two["meta"], id=two["id"]), ["Consolidation"],
                              pad_to_square=False)
    assert cls.tolist() == [0, 0] and np.allclose(boxes[0], [10 / 60, 5 / 50, 25 / 60, 25 / 50])


def test_rsna_layout_errors(tmp_path):
    with pytest.raises(ConfigError, match="stage_2_train_labels.csv"):
        RsnaPneumoniaPreparer(tmp_path)
    (tmp_path / "stage_2_train_labels.csv").write_text("patientId,x,y,width,height,Target\n")
    with pytest.raises(ConfigError, match="stage_2_train_images"):
        RsnaPneumoniaPreparer(tmp_path)


def test_real_rsna_stage_2_train_labels(iu_wheel, tmp_path):
    """torchxrayvision ships the real stage_2_train_labels.csv: every row parses, counts match."""
    with zipfile.ZipFile(iu_wheel) as zf:
        inner = zipfile.ZipFile(io.BytesIO(zf.read("torchxrayvision/data/kaggle_stage_2_train_labels.csv.zip")))
    path = tmp_path / "stage_2_train_labels.csv"
    path.write_bytes(inner.read("stage_2_train_labels.csv"))
    entries = parse_rsna_labels(path)
    assert len(path.read_text().splitlines()) - 1 == 30227
    assert len(entries) == 26684 and not [e for e in entries.values() if e["problem"]]
    positive = [e for e in entries.values() if e["target"]]
    assert len(positive) == 6012 and sum(len(e["boxes"]) for e in positive) == 9555
    assert max(len(e["boxes"]) for e in positive) == 4
    boxes = np.array([b for e in positive for b in e["boxes"]])
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert boxes.min() >= 0 and boxes.max() <= 1024  # inside the 1024 x 1024 images
    assert entries["00436515-870c-4b36-a041-de91049b9ab4"]["boxes"][0] == [264.0, 152.0, 477.0, 531.0]
