"""IU (NLMCXR) reader: a tiny XML/tgz/wheel fixture built here, and the real wheel when cached."""
from __future__ import annotations

import zipfile

import pytest

from medvlp.data import iu
from medvlp.errors import DataError
from tests.iu_fixture import write_iu_tgz

XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation><uId id="CXR{n}"/><MedlineCitation><Article><Abstract>
<AbstractText Label="COMPARISON">None.</AbstractText>
<AbstractText Label="INDICATION">Cough.</AbstractText>
<AbstractText Label="FINDINGS">{findings}</AbstractText>
<AbstractText Label="IMPRESSION">{impression}</AbstractText>
</Abstract></Article></MedlineCitation>
<MeSH>{major}<automatic>Effusion</automatic></MeSH>
<parentImage id="CXR{n}_IM-0001-1001"><figureId>F1</figureId></parentImage>
<parentImage id="CXR{n}_IM-0001-2001"><figureId>F2</figureId></parentImage>
</eCitation>"""


def _tgz(tmp_path):
    reports = [
        (10, "Small right pleural effusion.", "Effusion.", ["Pleural Effusion/right/small"]),
        (2, "", "Normal chest x-XXXX.", ["normal"]),
    ]
    return write_iu_tgz(tmp_path / "NLMCXR_reports.tgz", reports, XML)


def test_reader_from_tgz_and_wheel(tmp_path):
    tgz = _tgz(tmp_path)
    wheel = tmp_path / "torchxrayvision-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(iu.TGZ_MEMBER, tgz.read_bytes())
    for source in (tgz, wheel):
        reports = iu.load_iu_reports(source)
        assert [r.id for r in reports] == ["CXR2", "CXR10"]
        r2, r10 = reports
        assert r10.findings == "Small right pleural effusion." and r10.impression == "Effusion."
        assert r10.comparison == "None." and r10.indication == "Cough."
        assert r10.major == ["Pleural Effusion/right/small"] and r10.automatic == ["Effusion"]
        assert r10.images == ["CXR10_IM-0001-1001", "CXR10_IM-0001-2001"]
        assert r2.findings == "" and r2.text() == "Normal chest x-XXXX."


def test_fetch_reuses_cached_wheel(tmp_path, monkeypatch):
    (tmp_path / "wheels").mkdir()
    wheel = tmp_path / "wheels" / "torchxrayvision-9.9-py3-none-any.whl"
    wheel.write_bytes(b"")
    assert iu.fetch_torchxrayvision_wheel(tmp_path) == wheel
    monkeypatch.setenv("MEDVLP_CACHE", str(tmp_path))
    assert iu.fetch_torchxrayvision_wheel() == wheel


def test_fetch_failure_says_how_to_fix(tmp_path, monkeypatch):
    def fail(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(iu.subprocess, "run", fail)
    with pytest.raises(DataError, match="copy the torchxrayvision-.*whl file into"):
        iu.fetch_torchxrayvision_wheel(tmp_path)


def test_bad_sources(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        iu.load_iu_reports(tmp_path / "missing.tgz")
    bad = tmp_path / "x.whl"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("other.txt", "x")
    with pytest.raises(DataError, match="not a torchxrayvision wheel"):
        iu.load_iu_reports(bad)


def test_clean_placeholders():
    assert iu.clean_placeholders("There are no XXXX of a pleural effusion.") == "There are no of a pleural effusion."
    assert iu.clean_placeholders("Normal chest x-XXXX. XXXX XXXX, stable.") == "Normal chest x., stable."
    assert iu.clean_placeholders("XXXX", "[removed]") == "[removed]"
    assert iu.clean_placeholders("Boxxxxed text") == "Boxxxxed text"  # only whole placeholder words


def test_split_half_is_fixed_and_balanced():
    assert iu.split_half("CXR1") == iu.split_half("CXR1")
    splits = [iu.split_half(f"CXR{i}") for i in range(2000)]
    assert set(splits) == {"dev", "heldout"} and 900 < splits.count("dev") < 1100


def test_mesh_findings_and_labels():
    mapping = iu.load_mesh_map()
    tags = ["Pleural Effusion/right/small", "Pulmonary Atelectasis/base/left/mild",
            "Calcified Granuloma/lung/upper lobe/right", "Opacity/lung/base/bilateral",
            "Pleural Effusion/bilateral/right/left", "Cardiomegaly/borderline", "Fractures, Bone/ribs/left/healed"]
    assert iu.mesh_findings(tags, mapping) == [
        {"name": "Pleural Effusion", "side": "right", "zone": "", "severity": "small"},
        {"name": "Atelectasis", "side": "left", "zone": "lower", "severity": "mild"},
        {"name": "Calcified Granuloma", "side": "right", "zone": "upper", "severity": ""},
        {"name": "Pleural Effusion", "side": "bilateral", "zone": "", "severity": ""},
        {"name": "Cardiomegaly", "side": "", "zone": "", "severity": "mild"},
        {"name": "Fracture", "side": "left", "zone": "", "severity": ""},
    ]
    assert iu.mesh_findings(["normal"], mapping) == []
    labels = iu.mesh_labels(tags, mapping)
    assert labels["Pleural Effusion"] == 1 and labels["Consolidation"] == 0 and labels["No Finding"] == 0
    assert iu.mesh_labels(["Spine/degenerative"], mapping)["No Finding"] == 1  # derived
    assert iu.mesh_labels(["Spine/degenerative"], mapping, "heading")["No Finding"] == 0
    assert iu.mesh_labels(["normal"], mapping, "heading")["No Finding"] == 1


def test_real_wheel(iu_wheel):
    reports = iu.load_iu_reports(iu_wheel)
    assert len(reports) == 3955 and len({r.id for r in reports}) == 3955
    assert sum(not r.findings for r in reports) == 530
    n_dev = sum(iu.split_half(r.id) == "dev" for r in reports)
    assert abs(n_dev - 3955 / 2) < 100
    assert sum("normal" in r.headings for r in reports) > 1000
