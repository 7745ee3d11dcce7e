"""FLAIR-style retinal folder: per-dataset image folders + dataframes/<dataset>.csv (image, atributes, categories)."""
from __future__ import annotations

import numpy as np
import pytest

from medvlp.data.prepare import prepare
from medvlp.data.prepare.retina import RetinaPreparer, parse_categories
from medvlp.errors import ConfigError, DataError
from tests.prepare_helpers import (
    manifest_rows,
    png_array,
    quarantine,
    shard_members,
    write_image,
)


def _fixture(root):
    write_image(root / "01_EYEPACS/train/13_left.jpeg", (60, 80), seed=0, rgb=True)
    write_image(root / "01_EYEPACS/train/13_right.jpeg", (60, 80), seed=1, rgb=True)
    write_image(root / "02_MESSIDOR/IMAGES/20051020_43808_0100_PP.png", (40, 40), seed=2, rgb=True)
    (root / "dataframes").mkdir()
    (root / "dataframes/01_EYEPACS.csv").write_text(
        "image,atributes,categories\n"
        "01_EYEPACS/train/13_left.jpeg,[],['no diabetic retinopathy']\n"
        "01_EYEPACS/train/13_right.jpeg,[],\"['mild diabetic retinopathy', 'drusen']\"\n"
        "01_EYEPACS/train/99_left.jpeg,[],['no diabetic retinopathy']\n")
    (root / "dataframes/02_MESSIDOR.csv").write_text(
        "image,atributes,categories\n"
        "02_MESSIDOR/IMAGES/20051020_43808_0100_PP.png,[],\"['no diabetic retinopathy', 'no macular edema'\"\n")


def test_retina_categories_rgb(tmp_path):
    _fixture(tmp_path / "raw")
    out = tmp_path / "out"
    res = prepare("retina", tmp_path / "raw", out, image_size=40, progress=False)
    assert res.rows == 2 and res.quarantine_reasons == {"missing_file": 1, "bad_label": 1}
    assert "is not a list" in quarantine(out)["02_MESSIDOR/IMAGES/20051020_43808_0100_PP"]["detail"]
    rows = manifest_rows(out)
    right = rows["01_EYEPACS/train/13_right"]
    assert right["meta"]["categories"] == ["mild diabetic retinopathy", "drusen"]
    assert right["findings"] == "mild diabetic retinopathy; drusen" and right["labels"] == {}
    assert right["meta"]["dataset"] == "01_EYEPACS"
    png = png_array(shard_members(out)[right["meta"]["key"]]["png"])
    assert png.shape == (30, 40, 3) and png.dtype == np.uint8 and right["meta"]["bits"] == 8  # RGB kept


def test_parse_categories_and_errors(tmp_path):
    assert parse_categories("['a', 'b c']") == ["a", "b c"]
    assert parse_categories("glaucoma; cataract") == ["glaucoma", "cataract"]
    assert parse_categories("[1") is None and parse_categories("['a'") is None
    with pytest.raises(ConfigError, match="dataframes"):
        RetinaPreparer(tmp_path)
    (tmp_path / "d.csv").write_text("path,label\nx.jpg,a\n")
    with pytest.raises(DataError, match="missing required column"):
        list(RetinaPreparer(tmp_path, csv=["d.csv"]).records())


def test_retina_cli_with_csv_flag(tmp_path):
    from medvlp.cli import main

    _fixture(tmp_path / "raw")
    assert main(["prepare", "retina", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "o"), "--image-size",
                 "16", "--workers", "1", "--no-progress", "--csv", "dataframes/01_EYEPACS.csv"]) == 0
    rows = manifest_rows(tmp_path / "o")
    assert set(rows) == {"01_EYEPACS/train/13_left", "01_EYEPACS/train/13_right"}
