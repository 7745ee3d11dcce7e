"""Issue 7's bad-input list, for the cases no other test covers (the full mapping of input -> test ->
behaviour is the "Bad inputs" table of docs/data/prepare.md).

Bad samples inside a `medvlp prepare` run (a DICOM without pixel data, an unsupported transfer
syntax, a truncated JPG) are quarantined and counted with a message naming the file; a bad
manifest (missing column, label code outside the allowed ones) or a missing image at load time
stops with a message naming the file, line or field.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from medvlp.data.loader import check_images_exist
from medvlp.data.manifest import read_info, read_manifest, write_manifest
from medvlp.data.prepare import prepare
from medvlp.data.prepare.folder import FolderPreparer
from medvlp.data.sample import Sample
from medvlp.errors import DataError

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file


def _jpg(path, cut: bool = False) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2] if cut else data)


def test_prepare_quarantines_and_counts_undecodable_dicom_and_truncated_jpg(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    nopix = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del nopix.PixelData
    nopix.save_as(raw / "nopix.dcm")
    video = pydicom.dcmread(get_testdata_file("JPEG-lossy.dcm"))
    video.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video: no decoder exists
    video.save_as(raw / "video.dcm")
    _jpg(raw / "cut.jpg", cut=True)
    _jpg(raw / "ok.jpg")
    rows = ["path,report,subject_id"] + [f"{n},FINDINGS: clear.,s{i}" for i, n in
                                         enumerate(["nopix.dcm", "video.dcm", "cut.jpg", "ok.jpg"])]
    (raw / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    res = prepare(FolderPreparer(raw, csv="labels.csv"), None, out, image_size=16, progress=False)
    assert (res.rows, res.quarantine_reasons) == (1, {"unreadable": 3})  # the run goes on, nothing silent
    q = {r["file"]: r for r in map(json.loads, (out / "quarantine.jsonl").read_text().splitlines())}
    assert "nopix.dcm: DICOM without pixel data" in q["nopix.dcm"]["detail"]
    assert "video.dcm: unsupported DICOM transfer syntax MPEG2" in q["video.dcm"]["detail"]
    assert "cut.jpg: corrupt or truncated image" in q["cut.jpg"]["detail"]
    assert read_info(out)["quarantine"]["total"] == 3
    assert [s.id for s in read_manifest(out)] == ["ok"]


def _manifest(tmp_path, **row_changes):
    folder = tmp_path / "ds"
    write_manifest(folder, [Sample(id="a", subject_id="s1", study_id="t1", split="test", labels={"Edema": 1})],
                   {"name": "x"})
    row = json.loads((folder / "manifest.jsonl").read_text())
    for k, v in row_changes.items():
        if v is None:
            del row[k]
        else:
            row[k] = v
    (folder / "manifest.jsonl").write_text(json.dumps(row) + "\n")
    return folder


def test_manifest_with_a_missing_column_stops_naming_file_line_and_field(tmp_path):
    folder = _manifest(tmp_path, subject_id=None)
    with pytest.raises(DataError, match=r"manifest\.jsonl:1: missing required field\(s\) subject_id"):
        read_manifest(folder)


def test_manifest_label_outside_allowed_codes_stops_naming_the_class(tmp_path):
    folder = _manifest(tmp_path, labels={"Edema": 2})
    with pytest.raises(DataError, match=r"manifest\.jsonl:1: label 'Edema' has code 2; allowed codes: 1 \(positive\)"):
        read_manifest(folder)


def test_missing_image_file_stops_before_loading(tmp_path):
    ok = tmp_path / "ok.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(ok)
    samples = [Sample(id=i, subject_id="s", study_id="t", split="test", image=str(tmp_path / f"{i}.png"))
               for i in ("ok", "gone")]
    with pytest.raises(DataError, match=r"1 of 2 images are missing, e\.g\. gone -> .*gone\.png.*data\.manifest"):
        check_images_exist(samples)
    check_images_exist(samples[:1])
