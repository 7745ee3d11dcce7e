"""CheXpert preparer: a tiny fixture laid out as distributed, and the real train.csv of torchxrayvision."""
from __future__ import annotations

import gzip
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medvlp.cli import main
from medvlp.data.manifest import read_info, read_manifest
from medvlp.data.prepare import prepare
from medvlp.data.prepare.chexpert import (
    OBSERVATIONS,
    CheXpertPreparer,
    parse_chexpert_csv,
)
from medvlp.errors import ConfigError, DataError

HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(OBSERVATIONS)


def _row(path: str, frontal: bool, values: dict[str, str], ap_pa: str = "AP") -> str:
    cells = [values.get(o, "") for o in OBSERVATIONS]
    return ",".join([path, "Female", "68", "Frontal" if frontal else "Lateral", ap_pa if frontal else "", *cells])


def _fixture(top: Path) -> Path:
    """CheXpert-v1.0-small/{train,valid}.csv + train/patientNNNNN/studyN/viewK_*.jpg."""
    ds = top / "CheXpert-v1.0-small"
    images = ["train/patient00001/study1/view1_frontal.jpg", "train/patient00001/study1/view2_lateral.jpg",
              "train/patient00001/study2/view1_frontal.jpg", "train/patient00002/study1/view1_frontal.jpg",
              "train/patient00003/study1/view1_frontal.jpg", "valid/patient64541/study1/view1_frontal.jpg"]
    for i, rel in enumerate(images):
        (ds / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((64, 48), 40 * i, np.uint8)).save(ds / rel)
    p = "CheXpert-v1.0-small/"
    train = [HEADER,
             _row(p + images[0], True, {"No Finding": "1.0", "Support Devices": "1.0"}),
             _row(p + images[1], False, {"No Finding": "1.0"}),
             _row(p + images[2], True, {"Cardiomegaly": "-1.0", "Lung Opacity": "1.0", "Edema": "0.0"}, "PA"),
             _row(p + images[3], True, {"Pleural Effusion": "2.0"}),  # outside the allowed values
             _row(p + images[4].replace("patient00003", "patient00009"), True, {})]  # image not on disk
    (ds / "train.csv").write_text("\n".join(train) + "\n")
    (ds / "valid.csv").write_text("\n".join([HEADER, _row(p + images[5], True, {"Pneumothorax": "1.0"})]) + "\n")
    return top


def test_chexpert_fixture(tmp_path):
    res = prepare(CheXpertPreparer(_fixture(tmp_path / "raw")), None, tmp_path / "out", image_size=32,
                  progress=False)
    assert (res.rows, res.quarantine_reasons) == (3, {"bad_label": 1, "missing_file": 1})
    rows = {r.id: r for r in read_manifest(tmp_path / "out")}
    assert sorted(rows) == ["train/patient00001/study1/view1_frontal", "train/patient00001/study2/view1_frontal",
                            "valid/patient64541/study1/view1_frontal"]
    r = rows["train/patient00001/study2/view1_frontal"]
    assert (r.subject_id, r.study_id, r.split, r.view) == ("patient00001", "patient00001/study2", "train", "PA")
    assert r.labels["Cardiomegaly"] == -1 and r.labels["Edema"] == 0 and r.labels["Atelectasis"] == -2
    assert set(r.labels) == {"No Finding", "Cardiomegaly", "Edema", "Consolidation", "Atelectasis",
                             "Pneumothorax", "Pleural Effusion", "Fracture", "Support Devices"}
    assert r.meta["labels_extra"]["Lung Opacity"] == 1 and r.meta["sex"] == "Female" and r.meta["age"] == 68
    assert rows["valid/patient64541/study1/view1_frontal"].split == "val"
    assert read_info(tmp_path / "out")["split_counts"] == {"train": 2, "val": 1}


def test_chexpert_all_views_and_cli(tmp_path, capsys):
    root = _fixture(tmp_path / "raw") / "CheXpert-v1.0-small"  # --root may be the dataset folder itself
    assert main(["prepare", "chexpert", "--root", str(root), "--out", str(tmp_path / "out"), "--views", "all",
                 "--image-size", "16", "--workers", "1", "--no-progress"]) == 0
    assert "4 images, 2 quarantined" in capsys.readouterr().out
    lateral = [r for r in read_manifest(tmp_path / "out") if r.view == "LATERAL"]
    assert [r.id for r in lateral] == ["train/patient00001/study1/view2_lateral"]


def test_chexpert_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match="no train.csv or valid.csv"):
        CheXpertPreparer(tmp_path)
    (tmp_path / "train.csv").write_text("Path,Sex,Age\nx.jpg,Male,50\n")
    with pytest.raises(DataError, match=r"train.csv: missing required column\(s\) Frontal/Lateral"):
        list(CheXpertPreparer(tmp_path).records())


def test_real_chexpert_train_csv(iu_wheel, tmp_path):
    """torchxrayvision ships CheXpert-v1.0-small's real train.csv: parse all of it."""
    with zipfile.ZipFile(iu_wheel) as zf:
        data = zf.read("torchxrayvision/data/chexpert_train.csv.gz")
    path = tmp_path / "train.csv.gz"
    path.write_bytes(data)
    stats = Counter()
    records = parse_chexpert_csv(path, "train", stats)
    assert len(records) == 223414 == len(gzip.decompress(data).splitlines()) - 1
    assert not [r for r in records if r.problem]
    assert stats["frontal"] + stats["lateral"] == 223414 and stats["frontal"] > 3 * stats["lateral"]
    first = records[0]
    assert first.image == "train/patient00001/study1/view1_frontal.jpg" and first.subject_id == "patient00001"
    assert first.labels["No Finding"] == 1 and first.labels["Support Devices"] == 1 and first.view == "AP"
    cardio = Counter(r.labels["Cardiomegaly"] for r in records)
    assert cardio == {-2: 177211, 1: 27000, 0: 11116, -1: 8087}
    assert len({r.subject_id for r in records}) > 60000  # CheXpert has 64,540 training patients
