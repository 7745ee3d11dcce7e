"""MIMIC-CXR preparer on a tiny fixture laid out as PhysioNet distributes MIMIC-CXR-JPG 2.0.0 (and the DICOM tree)."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medvlp.data.manifest import read_info, read_manifest
from medvlp.data.prepare import prepare
from medvlp.data.prepare.chexpert import OBSERVATIONS
from medvlp.data.prepare.mimic import MimicCXRPreparer
from medvlp.errors import ConfigError, DataError
from tests.test_prepare import _dicom

# (subject, study, dicom_id, split, ViewPosition)
IMAGES = [("10000032", "50414267", "02aa804e-bde0afdd", "train", "PA"),
          ("10000032", "50414267", "174413ec-4ec4c1f7", "train", "LATERAL"),
          ("10000032", "53189527", "2a2277a9-b0ded155", "train", "AP"),
          ("10000764", "57375967", "096052b7-d256dc40", "validate", "AP"),
          ("11000011", "51029426", "3a6f0c1f-6e7f1d9b", "test", "PA"),   # report is empty
          ("12000022", "52000001", "4b1e2a3d-00000001", "test", "PA")]   # report file missing
REPORTS = {
    "50414267": "                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n\n INDICATION:  ___F "
                "with cough\n\n FINDINGS:\n There is no focal consolidation, pleural effusion or pneumothorax.\n\n"
                " IMPRESSION:\n No acute cardiopulmonary process.\n",
    "53189527": "FINDINGS: Mild cardiomegaly. Small left pleural effusion.\nIMPRESSION: Cardiomegaly and effusion.\n",
    "57375967": "IMPRESSION: Right pneumothorax.\n",
    "51029426": "FINAL REPORT\nFINDINGS: ___\n",
}


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    text = "\n".join([",".join(header)] + [",".join(r) for r in rows]) + "\n"
    path.write_bytes(gzip.compress(text.encode()))  # PhysioNet ships the CSVs gzipped


def _fixture(root: Path, suffix: str = ".jpg") -> Path:
    for i, (subject, study, dicom_id, _, _) in enumerate(IMAGES):
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        folder.mkdir(parents=True, exist_ok=True)
        if suffix == ".jpg":
            Image.fromarray(np.full((60, 50), 30 * i, np.uint8)).save(folder / f"{dicom_id}.jpg")
        else:
            _dicom(folder / f"{dicom_id}.dcm", "SHOULD-NOT-BE-USED", "Nobody^Here", f"1.2.{i}", i)
        if study in REPORTS:
            (folder.parent / f"s{study}.txt").write_text(REPORTS[study])
    _write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
               [[d, st, su, sp] for su, st, d, sp, _ in IMAGES])
    _write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz",
               ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                "Columns", "StudyDate"],
               [[d, su, st, "CHEST (PA AND LAT)", v, "60", "50", "21800506"] for su, st, d, _, v in IMAGES])
    chex = {"50414267": {"No Finding": "1.0"}, "53189527": {"Cardiomegaly": "1.0", "Pleural Effusion": "-1.0",
                                                            "Lung Opacity": "0.0"}}
    _write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *OBSERVATIONS],
               [[su, st, *(chex[st].get(o, "") for o in OBSERVATIONS)]
                for su, st in sorted({(i[0], i[1]) for i in IMAGES}) if st in chex])
    return root


def test_mimic_jpg_layout(tmp_path):
    res = prepare(MimicCXRPreparer(_fixture(tmp_path / "raw")), None, tmp_path / "out", image_size=32,
                  progress=False)
    assert res.quarantine_reasons == {"empty_report": 1, "missing_report": 1} and res.rows == 3
    rows = {r.id: r for r in read_manifest(tmp_path / "out")}
    assert "174413ec-4ec4c1f7" not in rows  # lateral: frontal views only by default
    r = rows["02aa804e-bde0afdd"]
    assert (r.subject_id, r.study_id, r.split, r.view) == ("10000032", "50414267", "train", "PA")
    assert r.findings == "There is no focal consolidation, pleural effusion or pneumothorax."
    assert r.impression == "No acute cardiopulmonary process."
    assert r.meta["sections"]["indication"] == "___F with cough" and r.labels["No Finding"] == 1
    r = rows["2a2277a9-b0ded155"]
    assert r.labels["Cardiomegaly"] == 1 and r.labels["Pleural Effusion"] == -1 and r.labels["Edema"] == -2
    assert r.meta["labels_extra"]["Lung Opacity"] == 0 and "StudyDate" not in r.meta
    r = rows["096052b7-d256dc40"]  # no CheXpert row: the project's labeller reads the report
    assert r.split == "val" and r.impression == "Right pneumothorax." and r.labels["Pneumothorax"] == 1
    info = read_info(tmp_path / "out")
    assert info["split_counts"] == {"train": 2, "val": 1} and info["enumeration"] == {"filtered_view": 1}


def test_mimic_all_views_no_reports(tmp_path):
    root = _fixture(tmp_path / "raw")
    res = prepare(MimicCXRPreparer(root, views="all", reports="none"), None, tmp_path / "out", image_size=16,
                  progress=False)
    assert res.rows == 6 and res.quarantined == 0
    rows = {r.id: r for r in read_manifest(tmp_path / "out")}
    assert rows["174413ec-4ec4c1f7"].view == "LATERAL" and rows["3a6f0c1f-6e7f1d9b"].labels == {}
    assert not rows["02aa804e-bde0afdd"].findings


def test_mimic_dicom_layout_keeps_dataset_ids(tmp_path):
    root = _fixture(tmp_path / "raw", suffix=".dcm")
    res = prepare(MimicCXRPreparer(root, reports="none", views="all"), None, tmp_path / "out", image_size=16,
                  progress=False)  # no --subject-key needed: MIMIC provides subject ids
    assert res.rows == 6
    rows = read_manifest(tmp_path / "out")
    assert {r.subject_id for r in rows} == {"10000032", "10000764", "11000011", "12000022"}
    assert all(r.meta["format"] == "dicom" and r.meta["bits"] == 16 for r in rows)
    assert b"SHOULD-NOT-BE-USED" not in (tmp_path / "out" / "manifest.jsonl").read_bytes()


def test_mimic_bad_inputs(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(ConfigError, match="mimic-cxr-2.0.0-split.csv .*not? found|none of mimic-cxr-2.0.0-split.csv"):
        list(MimicCXRPreparer(tmp_path / "raw").records())
    _write_csv(tmp_path / "raw" / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "split"], [["a", "1", "train"]])
    with pytest.raises(DataError, match=r"split.csv.gz: missing required column\(s\) subject_id"):
        list(MimicCXRPreparer(tmp_path / "raw").records())
    with pytest.raises(ConfigError, match="--reports .*folder not found"):
        MimicCXRPreparer(tmp_path / "raw", reports=str(tmp_path / "nope"))
