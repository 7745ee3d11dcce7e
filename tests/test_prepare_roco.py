"""ROCO preparer: a tiny fixture laid out as razorx89/roco-dataset after scripts/fetch.py."""
from __future__ import annotations

import pytest

from medvlp.data.prepare import prepare
from medvlp.data.prepare.roco import RocoPreparer, dlinks_file_names
from medvlp.errors import ConfigError
from tests.prepare_helpers import manifest_rows, quarantine, write_image

URL = "ftp://ftp.ncbi.nlm.nih.gov/pub/pmc/oa_package/08/e0/{pmc}.tar.gz"


def _folder(root, split, entries, csv=False):
    """entries: (roco id, pmc id, figure file, caption, write image?)."""
    folder = root / "data" / split / "radiology"
    folder.mkdir(parents=True)
    (folder / "captions.txt").write_text("".join(f"{r}\t {c} \n" for r, _, _, c, _ in entries))
    if csv:  # the revised releases: a cc_*.csv naming the files instead of dlinks.txt
        (folder / "cc_tp_test.csv").write_text("ROCO_ID,PMC_ID,CC\n" + "".join(
            f"{r},{p}_{f},CC BY\n" for r, p, f, _, _ in entries))
    else:
        (folder / "dlinks.txt").write_text("".join(
            f"{r}\t wget {URL.format(pmc=p)}\t {f}\n" for r, p, f, _, _ in entries))
    for n, (_, p, f, _, write) in enumerate(entries):
        if write:
            write_image(folder / "images" / f"{p}_{f}", (30, 44), seed=n, rgb=n % 2 == 0)


def _fixture(root):
    _folder(root, "train", [("ROCO_00002", "PMC4083729", "AMJCR0005-0237-g002.jpg", "Axial CT of the  abdomen.", True),
                            ("ROCO_00003", "PMC4083729", "AMJCR0005-0237-g003.jpg", "Chest radiograph, PA.", True),
                            ("ROCO_00005", "PMC3000001", "gr1.jpg", "Dead link figure.", False),
                            ("ROCO_00007", "PMC3000002", "gr2.jpg", " ", True)])
    _folder(root, "validation", [("ROCO_00010", "PMC5000001", "f1.jpg", "MRI of the knee.", True)])
    _folder(root, "test", [("ROCO_00001", "PMC4608653", "cro-0008-0385-g01.jpg", "Ultrasound.", True)], csv=True)
    (root / "data/train/non-radiology").mkdir(parents=True)


def test_roco_pairs_and_splits(tmp_path):
    _fixture(tmp_path / "roco-dataset")
    out = tmp_path / "out"
    res = prepare("roco", tmp_path / "roco-dataset", out, image_size=32, progress=False)
    assert res.rows == 4 and res.quarantine_reasons == {"missing_file": 1, "empty_report": 1}
    assert quarantine(out)["radiology/ROCO_00005"]["file"] == "train/radiology/images/PMC3000001_gr1.jpg"
    rows = manifest_rows(out)
    a = rows["radiology/ROCO_00002"]
    assert a["findings"] == "Axial CT of the abdomen." and a["labels"] == {} and a["split"] == "train"
    assert a["subject_id"] == rows["radiology/ROCO_00003"]["subject_id"] == "PMC4083729"  # one article
    assert rows["radiology/ROCO_00010"]["split"] == "val" and rows["radiology/ROCO_00001"]["split"] == "test"
    assert rows["radiology/ROCO_00001"]["meta"]["roco_id"] == "ROCO_00001"


def test_roco_dlinks_names_and_errors(tmp_path):
    path = tmp_path / "dlinks.txt"
    path.write_text(f"ROCO_00002\t wget {URL.format(pmc='PMC4083729')}\t AMJCR0005-0237-g002.jpg\n")
    assert dlinks_file_names(path) == {"ROCO_00002": "PMC4083729_AMJCR0005-0237-g002.jpg"}  # as fetch.py names it
    with pytest.raises(ConfigError, match="no train/ validation/ test/"):
        RocoPreparer(tmp_path)
    with pytest.raises(ConfigError, match="--subset"):
        RocoPreparer(tmp_path, subset="xray")
