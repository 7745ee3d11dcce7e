"""Real IU reports rendered as SynthCXR studies: a tiny hand-written IU archive, and the real wheel when cached."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medvlp.data.manifest import read_info, read_manifest
from medvlp.data.sample import NEGATIVE, POSITIVE
from medvlp.data.synth import CLASSES, generate
from medvlp.data.synth.anatomy import sample_anatomy
from medvlp.data.synth.findings import make_finding
from medvlp.data.synth.generator import REPORT_SPLITS, decode_mask
from medvlp.data.synth.real import load_real_cases, merge_records, text_hints
from tests.iu_fixture import write_iu_tgz

SIZE = 64
XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation><uId id="CXR{n}"/><MedlineCitation><Article><Abstract>
<AbstractText Label="FINDINGS">{findings}</AbstractText>
<AbstractText Label="IMPRESSION">{impression}</AbstractText>
</Abstract></Article></MedlineCitation>
<MeSH>{major}</MeSH></eCitation>"""
# Hand-written sentences (never IU text): id, findings, impression, major tags.
REPORTS = [
    (3, "Small right pleural effusion. XXXX sternotomy wires.", "Right effusion.",
     ["Pleural Effusion/right/small", "Implanted Medical Device"]),
    (7, "The heart is mildly enlarged. Nodule in the left upper lobe.", "XXXX cardiomegaly.",
     ["Cardiomegaly/mild", "Nodule/left/upper lobe"]),
    (12, "Consolidation in the right lower lobe.", "Pneumonia.", ["Pneumonia/lower lobe", "Opacity/lung/right"]),
    (15, "", "", ["normal"]),  # empty: skipped and counted
    (21, "Lungs are clear.", "No acute disease.", ["normal"]),
    (30, "Left lower lobe atelectasis and consolidation.", "Atelectasis.",
     ["Pulmonary Atelectasis/left/base", "Consolidation/left/base", "Granuloma/bilateral"]),
]


def _tgz(path: Path) -> Path:
    return write_iu_tgz(path, REPORTS, XML)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def real_set(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("real")
    tgz = _tgz(root / "NLMCXR_reports.tgz")
    kw = {"subjects": 12, "studies_per_subject": (1, 2), "image_size": SIZE, "seed": 3, "progress": False}
    generate(root / "plain", **kw)
    generate(root / "with", real_reports=str(tgz), **kw)
    return root / "plain", root / "with", tgz


def test_iu_cases_added_after_synthetic_ones_and_synthetic_part_unchanged(real_set) -> None:
    plain, with_real, _ = real_set
    rows = (with_real / "manifest.jsonl").read_text().splitlines()
    base = (plain / "manifest.jsonl").read_text().splitlines()
    assert rows[: len(base)] == base  # same synthetic rows, same bytes
    iu_rows = [json.loads(r) for r in rows[len(base):]]
    assert [r["subject_id"] for r in iu_rows] == ["IU0003", "IU0007", "IU0012", "IU0021", "IU0030"]
    assert all(r["study_id"] == r["subject_id"] + "-T00" for r in iu_rows)
    for name in ("images/S00000/S00000-T00.png", "masks/S00000/S00000-T00.png"):
        assert (plain / name).read_bytes() == (with_real / name).read_bytes()
    assert "real_reports" not in read_info(plain)
    info = read_info(with_real)["real_reports"]
    assert (info["reports"], info["kept"], info["skipped_empty"]) == (6, 5, 1)
    assert sum(info["split_counts"].values()) == 5 and set(info["split_counts"]) <= REPORT_SPLITS


def test_deterministic_with_any_worker_count(real_set, tmp_path: Path) -> None:
    _, with_real, tgz = real_set
    generate(tmp_path / "again", subjects=12, studies_per_subject=(1, 2), image_size=SIZE, seed=3,
             progress=False, workers=2, real_reports=str(tgz))
    assert _files(with_real) == _files(tmp_path / "again")


def test_reports_labels_masks_and_splits(real_set) -> None:
    _, with_real, _ = real_set
    samples = read_manifest(with_real)
    split_of: dict[str, set[str]] = {}
    for s in samples:
        split_of.setdefault(s.subject_id, set()).add(s.split)
    assert all(len(v) == 1 for v in split_of.values())
    cases = {s.subject_id: s for s in samples if s.subject_id.startswith("IU")}
    for s in cases.values():
        assert s.split in REPORT_SPLITS and s.has_text and "XXXX" not in s.findings + s.impression
        assert s.meta["report_source"] == "iu" and s.meta["iu_id"] == "CXR" + str(int(s.subject_id[2:]))
        masks = decode_mask(with_real / s.meta["mask"])
        drawn = {f["name"] for f in s.meta["findings"]}
        assert drawn == {c for c in CLASSES[1:] if s.labels[c] == POSITIVE}
        assert (s.labels["No Finding"] == POSITIVE) == (not drawn)
        assert set(s.labels.values()) <= {POSITIVE, NEGATIVE}
        for c in CLASSES[1:]:
            assert masks[c].any() == (s.labels[c] == POSITIVE), (s.id, c)
        assert set(s.meta["report_labels"]) == set(CLASSES)
    assert cases["IU0003"].findings == "Small right pleural effusion. sternotomy wires."
    assert cases["IU0007"].impression == "cardiomegaly."
    assert cases["IU0021"].labels["No Finding"] == POSITIVE
    assert cases["IU0012"].labels["Consolidation"] == POSITIVE and cases["IU0012"].meta["mesh_unmapped"] == ["Opacity"]
    assert cases["IU0003"].meta["report_labels"]["Pleural Effusion"] == POSITIVE
    devices = [f for f in cases["IU0003"].meta["findings"] if f["name"] == "Support Devices"]
    assert [f["device"] for f in devices] == ["sternotomy"]  # from the words, not the heading
    # consolidation (placed first, see PLACE_ORDER) takes the left lower cell: atelectasis there is dropped
    c30 = cases["IU0030"]
    assert c30.labels["Consolidation"] == POSITIVE and c30.labels["Atelectasis"] == NEGATIVE
    assert [d["name"] for d in c30.meta["dropped"]] == ["Atelectasis"]
    granulomas = [f for f in c30.meta["findings"] if f["name"] == "Calcified Granuloma"]
    assert sorted(f["side"] for f in granulomas) == ["left", "right"]  # bilateral: one per side
    vqa_side = [q for q in c30.meta["vqa"] if q["kind"] == "side" and q["finding"] == "Calcified Granuloma"]
    assert [q["answer"] for q in vqa_side] == ["bilateral"]


def test_stated_side_and_zone_are_drawn_there(real_set) -> None:
    _, with_real, _ = real_set
    cases = {s.subject_id: s for s in read_manifest(with_real) if s.subject_id.startswith("IU")}
    checks = [("IU0003", "Pleural Effusion", "right"), ("IU0007", "Nodule", "left"),
              ("IU0012", "Consolidation", "right"), ("IU0030", "Consolidation", "left")]
    for sid, name, side in checks:
        s = cases[sid]
        f = next(f for f in s.meta["findings"] if f["name"] == name)
        assert f["side"] == side
        xs = np.nonzero(decode_mask(with_real / s.meta["mask"])[name])[1]
        # patient right = image left on a frontal film
        assert (xs.mean() < SIZE / 2) == (side == "right"), (sid, name, xs.mean())
    nodule = next(f for f in cases["IU0007"].meta["findings"] if f["name"] == "Nodule")
    assert (nodule["zone"], nodule["severity"]) == ("upper", "small")  # "mild" -> the nodule's "small"
    assert next(f for f in cases["IU0012"].meta["findings"] if f["name"] == "Consolidation")["side"] == "right"
    req = next(r for r in cases["IU0012"].meta["requested"] if r["name"] == "Consolidation")
    assert req["filled"] == ["side"]  # the tag had no side; the sentence said "right"


def test_text_hints_and_make_finding_constraints() -> None:
    hints = text_hints("No pneumothorax. Small bilateral pleural effusions.", "Pleural Effusion")
    assert hints == {"side": "bilateral", "zone": "", "severity": "small"}
    assert text_hints("No effusion.", "Pleural Effusion")["side"] == ""
    assert text_hints("Atelectasis at the left and right bases.", "Atelectasis")["side"] == "bilateral"
    rng = np.random.default_rng(0)
    anat = sample_anatomy(rng)
    eff = make_finding(rng, anat, "Pleural Effusion", side="left", severity="large")
    assert (eff.side, eff.zone, eff.severity) == ("left", "lower", "large") and "level" in eff.params
    assert make_finding(rng, anat, "Consolidation", side="left", zone="mid", placed=[eff]) is None
    cons = make_finding(rng, anat, "Consolidation", side="left", zone="upper", placed=[eff])
    assert (cons.side, cons.zone) == ("left", "upper")
    with pytest.raises(ValueError):
        make_finding(rng, anat, "Nodule", side="bilateral")
    merged = merge_records([{"name": "Nodule", "side": "left", "zone": "upper", "severity": "small"},
                            {"name": "Nodule", "side": "right", "zone": "lower", "severity": "small"}])
    assert merged == [{"name": "Nodule", "side": "bilateral", "zone": "", "severity": "small"}]


def test_real_wheel_cases(tmp_path: Path, iu_wheel: Path) -> None:
    cases, info = load_real_cases(iu_wheel, seed=0)
    assert info["reports"] == 3955 and info["kept"] == len(cases) == 3927 and info["skipped_empty"] == 28
    assert info["findings_drawn"] + info["findings_dropped"] == info["findings_requested"]
    assert info["findings_dropped"] < 0.15 * info["findings_requested"]
    for name in ("Cardiomegaly", "Pleural Effusion", "Nodule", "Scoliosis"):
        stated = [c for c in cases if any(r["name"] == name for r in c.meta["requested"])]
        drawn = sum(any(f.name == name for f in c.findings) for c in stated)
        assert len(stated) > 20 and drawn >= 0.9 * len(stated), (name, drawn, len(stated))
    assert len({c.subject_id for c in cases}) == len(cases)
    # render a few (the generator's path) and check labels follow the drawn findings
    from medvlp.data.synth.generator import _Job
    from medvlp.data.synth.real import case_sample

    job = _Job(str(tmp_path), 0, (1, 1), 48, 5, True)
    for case in cases[:: len(cases) // 20][:20]:
        s = case_sample((job, case, "train"))
        assert {f["name"] for f in s.meta["findings"]} == {c for c in CLASSES[1:] if s.labels[c] == POSITIVE}
