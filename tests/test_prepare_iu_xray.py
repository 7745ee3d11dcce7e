"""IU X-ray preparer: a tiny Open-i layout (ecgen-radiology XML + flat NLMCXR_png) built here with
hand-written sentences, and the real NLMCXR report archive from torchxrayvision's wheel (reports only)."""
from __future__ import annotations

import io
import tarfile
import zipfile

import pytest

from medvlp.data.iu import TGZ_MEMBER
from medvlp.data.prepare import prepare
from medvlp.data.prepare.iu_xray import IUXrayPreparer
from medvlp.errors import ConfigError
from tests.prepare_helpers import manifest_rows, quarantine, write_image

XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation><uId id="CXR{n}"/><MedlineCitation><Article><Abstract>
<AbstractText Label="COMPARISON">None.</AbstractText>
<AbstractText Label="INDICATION">XXXX-year-old with cough.</AbstractText>
<AbstractText Label="FINDINGS">{findings}</AbstractText>
<AbstractText Label="IMPRESSION">{impression}</AbstractText>
</Abstract></Article></MedlineCitation>
<MeSH>{major}</MeSH>{images}
</eCitation>"""


def _report(root, n, findings, impression, major, images):
    parents = "".join(f'<parentImage id="{i}"><figureId>F{k}</figureId></parentImage>' for k, i in enumerate(images, 1))
    text = XML.format(n=n, findings=findings, impression=impression, images=parents,
                      major="".join(f"<major>{m}</major>" for m in major))
    (root / "ecgen-radiology").mkdir(parents=True, exist_ok=True)
    (root / "ecgen-radiology" / f"{n}.xml").write_text(text)


def _fixture(root):
    _report(root, 1, "The heart is enlarged.", "Cardiomegaly.", ["Cardiomegaly/mild"],
            ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"])
    _report(root, 2, "Lungs are clear.", "No acute disease.", ["normal"], ["CXR2_IM-0652-1001"])
    _report(root, 10, "", "", ["normal"], ["CXR10_IM-0002-1001"])  # empty report
    _report(root, 3, "Right effusion.", "Effusion.", ["Pleural Effusion/right"], ["CXR3_IM-1384-1001"])
    for i, name in enumerate(["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001", "CXR2_IM-0652-1001", "CXR10_IM-0002-1001"]):
        write_image(root / "NLMCXR_png" / f"{name}.png", (50, 40), seed=i)  # CXR3's image is missing
    (root / "indiana_projections.csv").write_text(
        "uid,filename,projection\n1,CXR1_1_IM-0001-3001.png,Frontal\n1,CXR1_1_IM-0001-4001.png,Lateral\n"
        "2,CXR2_IM-0652-1001.png,Frontal\n")


def test_iu_xray_mesh_labels_and_quarantine(tmp_path):
    _fixture(tmp_path / "raw")
    out = tmp_path / "out"
    res = prepare("iu-xray", tmp_path / "raw", out, image_size=32, progress=False)
    assert res.rows == 3 and res.quarantine_reasons == {"empty_report": 1, "missing_file": 1}
    assert quarantine(out)["CXR3_IM-1384-1001"]["reason"] == "missing_file"
    rows = manifest_rows(out)
    assert list(rows) == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001", "CXR2_IM-0652-1001"]  # numeric report order
    a = rows["CXR1_1_IM-0001-3001"]
    assert a["subject_id"] == a["study_id"] == "CXR1" == rows["CXR1_1_IM-0001-4001"]["subject_id"]
    assert a["findings"] == "The heart is enlarged." and a["impression"] == "Cardiomegaly."
    assert a["labels"]["Cardiomegaly"] == 1 and a["labels"]["No Finding"] == 0 and a["labels"]["Edema"] == 0
    assert rows["CXR2_IM-0652-1001"]["labels"]["No Finding"] == 1
    assert a["meta"]["mesh"] == ["Cardiomegaly/mild"] and a["meta"]["sections"]["comparison"] == "None."
    assert "XXXX" not in a["meta"]["sections"]["indication"]  # de-identification placeholders removed


def test_iu_xray_projections_and_labeller(tmp_path):
    _fixture(tmp_path / "raw")
    frontal = list(IUXrayPreparer(tmp_path / "raw", projections="indiana_projections.csv", views="frontal").records())
    assert [r.id for r in frontal] == ["CXR1_1_IM-0001-3001", "CXR2_IM-0652-1001"] and frontal[0].view == "FRONTAL"
    assert all(r.labels is None for r in IUXrayPreparer(tmp_path / "raw", labels="labeller").records())
    with pytest.raises(ConfigError, match="needs --projections"):
        IUXrayPreparer(tmp_path / "raw", views="frontal")
    with pytest.raises(ConfigError, match="ecgen-radiology"):
        IUXrayPreparer(tmp_path / "raw" / "NLMCXR_png")


def test_real_iu_reports_enumerate(iu_wheel, tmp_path):
    """The real NLMCXR reports (from the wheel, extracted here): one record per listed image."""
    with zipfile.ZipFile(iu_wheel) as zf:
        data = zf.read(TGZ_MEMBER)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(tmp_path / "raw", filter="data")
    prep = IUXrayPreparer(tmp_path / "raw")
    records = list(prep.records())
    assert prep.stats["reports"] == 3955
    assert 7000 < len(records) < 8000 and len({r.id for r in records}) == len(records)  # 7,470 images
    assert len({r.subject_id for r in records}) == prep.stats["reports"] - prep.stats["reports_without_images"]
    assert all(r.image == f"NLMCXR_png/{r.id}.png" or r.image == f"{r.id}.png" for r in records)
    assert sum(r.labels["Cardiomegaly"] for r in records) > 300
