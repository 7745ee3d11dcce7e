"""SynthCXR generator: determinism, label/report/meta agreement, subject splits, rendering."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medvlp.data.manifest import read_info, read_manifest
from medvlp.data.sample import NEGATIVE, POSITIVE
from medvlp.data.synth import CLASSES, GENERATOR_VERSION, generate
from medvlp.data.synth.findings import Finding
from medvlp.data.synth.generator import make_study, make_subject
from medvlp.data.synth.render import render_study
from medvlp.data.synth.reports import KEYWORDS, NEGATION_PREFIXES, build_report
from medvlp.errors import ConfigError


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    generate(out, subjects=24, studies_per_subject=(1, 3), image_size=48, seed=7, progress=False)
    return out


def test_same_seed_gives_identical_bytes(dataset: Path, tmp_path: Path) -> None:
    again = generate(tmp_path / "b", subjects=24, studies_per_subject=(1, 3), image_size=48, seed=7, progress=False)
    assert again == tmp_path / "b" / "manifest.jsonl"
    first, second = _files(dataset), _files(tmp_path / "b")
    assert first.keys() == second.keys() and len(first) > 26
    assert first == second


def test_different_seed_differs(dataset: Path, tmp_path: Path) -> None:
    generate(tmp_path / "c", subjects=24, studies_per_subject=(1, 3), image_size=48, seed=8, progress=False)
    assert (dataset / "manifest.jsonl").read_bytes() != (tmp_path / "c" / "manifest.jsonl").read_bytes()
    first = np.asarray(Image.open(dataset / "images" / "S00000" / "S00000-T00.png"))
    other = np.asarray(Image.open(tmp_path / "c" / "images" / "S00000" / "S00000-T00.png"))
    assert not np.array_equal(first, other)


def test_manifest_and_images(dataset: Path) -> None:
    samples = read_manifest(dataset)
    info = read_info(dataset)
    assert info["name"] == "synthcxr" and info["version"] == GENERATOR_VERSION
    assert info["classes"] == CLASSES and info["seed"] == 7 and info["image_size"] == 48
    assert info["studies_per_subject"] == [1, 3] and sum(info["split_counts"].values()) == len(samples)
    assert len({s.id for s in samples}) == len(samples)
    for s in samples:
        assert re.fullmatch(r"S\d{5}", s.subject_id) and re.fullmatch(re.escape(s.subject_id) + r"-T\d{2}", s.study_id)
        assert s.view in ("PA", "AP") and s.meta["generator_version"] == GENERATOR_VERSION
        img = Image.open(s.image)
        assert img.mode == "L" and img.size == (48, 48)
        assert Path(s.image) == dataset / "images" / s.subject_id / f"{s.study_id}.png"
        json.dumps(s.meta)
    per_subject = {}
    for s in samples:
        per_subject.setdefault(s.subject_id, []).append(s)
    assert all(1 <= len(v) <= 3 for v in per_subject.values()) and len(per_subject) == 24


def test_splits_are_by_subject(dataset: Path) -> None:
    samples = read_manifest(dataset)
    split_of: dict[str, set[str]] = {}
    for s in samples:
        split_of.setdefault(s.subject_id, set()).add(s.split)
    assert all(len(v) == 1 for v in split_of.values())
    counts = {name: sum(1 for v in split_of.values() if name in v) for name in ("train", "val", "test")}
    assert counts == {"train": 17, "val": 2, "test": 5}  # round(24 * (0.7, 0.1, 0.2))


def _sentences(text: str) -> list[str]:
    return [t.strip() for t in re.split(r"(?<=\.)\s+", text) if t.strip()]


def _check_report(labels: dict[str, int], findings: str, impression: str) -> None:
    assert (labels["No Finding"] == POSITIVE) == all(labels[c] == NEGATIVE for c in CLASSES[1:])
    for section in (findings, impression):
        affirmed: set[str] = set()
        for sentence in _sentences(section):
            low = sentence.lower()
            named = {c for c, words in KEYWORDS.items() if any(w in low for w in words)}
            if low.startswith(NEGATION_PREFIXES):
                assert all(labels[c] == NEGATIVE for c in named), (sentence, labels)
            else:
                assert len(named) <= 1 and all(labels[c] == POSITIVE for c in named), (sentence, labels)
                affirmed |= named
            if "lungs are clear" in low:
                assert all(labels[c] == NEGATIVE for c in ("Consolidation", "Nodule", "Pleural Effusion", "Pneumothorax"))
        assert affirmed == {c for c in CLASSES[1:] if labels[c] == POSITIVE}, (section, labels)
    if labels["No Finding"] == POSITIVE:
        assert "acute" in impression.lower() or "normal" in impression.lower() or "no active" in impression.lower()


def test_labels_agree_with_reports_and_meta(dataset: Path) -> None:
    samples = read_manifest(dataset)
    assert any(s.labels["No Finding"] == POSITIVE for s in samples)
    for s in samples:
        assert set(s.labels) == set(CLASSES) and set(s.labels.values()) <= {POSITIVE, NEGATIVE}
        _check_report(s.labels, s.findings, s.impression)
        drawn = {f["name"] for f in s.meta["findings"]}
        assert drawn == {c for c in CLASSES[1:] if s.labels[c] == POSITIVE}
        text = s.text().lower()
        for f in s.meta["findings"]:
            assert f["side"] in text  # laterality is reported ("" for the heart)
            assert f["bbox"][0] < f["bbox"][2] <= 48 and f["bbox"][1] < f["bbox"][3] <= 48
            if f["name"] == "Nodule":
                assert 0.5 < f["radius"] < 4 and f["zone"] in text
            if f["name"] == "Cardiomegaly":
                assert f["ctr"] > 0.5
        if s.labels["Cardiomegaly"] == NEGATIVE:
            assert s.meta["ctr"] < 0.5


def test_reports_cover_every_finding_many_times() -> None:
    """Many random studies: every class appears, all with consistent reports."""
    seen = {c: 0 for c in CLASSES}
    for i in range(150):
        subject = make_subject(3, i, (1, 1))
        study = make_study(3, subject, 0)
        names = {f.name for f in study.findings}
        labels = {c: POSITIVE if (c in names or (c == "No Finding" and not names)) else NEGATIVE for c in CLASSES}
        findings, impression = build_report(study.findings, study.rng)
        _check_report(labels, findings, impression)
        for c, v in labels.items():
            seen[c] += v == POSITIVE
    assert all(15 <= n <= 75 for n in seen.values()), seen  # each class ~20-30% prevalence


@pytest.mark.parametrize("name", CLASSES[1:])
def test_each_finding_changes_the_image_inside_its_region(name: str) -> None:
    for i in range(400):  # the first study that has this finding
        subject = make_subject(11, i, (1, 1))
        study = make_study(11, subject, 0)
        target = [f for f in study.findings if f.name == name]
        if target:
            break
    else:
        pytest.fail(f"no {name} in 400 subjects")
    others = [f for f in study.findings if f.name != name]
    with_f = render_study(subject.anatomy, study.acquisition, study.findings, 64)
    without = render_study(subject.anatomy, study.acquisition, others, 64)
    mask = with_f.masks[name] > 0.5
    assert name not in without.masks and mask.sum() >= 6
    diff = np.abs(with_f.image.astype(int) - without.image.astype(int))
    assert diff[mask].mean() > 12, (name, diff[mask].mean())  # clearly visible at 64 px
    assert diff[~(with_f.masks[name] > 0.01)].mean() < 1.0  # and nothing changes far from it


def test_chronic_findings_persist_across_studies() -> None:
    for i in range(200):
        subject = make_subject(5, i, (3, 3))
        if subject.chronic:
            break
    studies = [make_study(5, subject, j) for j in range(3)]
    chronic = {(f.name, f.side, f.zone, f.severity) for f in subject.chronic}
    for study in studies:
        assert chronic <= {(f.name, f.side, f.zone, f.severity) for f in study.findings}


def test_other_image_sizes_render(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    from medvlp.data.synth.anatomy import sample_anatomy
    from medvlp.data.synth.render import sample_acquisition

    anat = sample_anatomy(rng)
    acq = sample_acquisition(rng)
    nodule = Finding("Nodule", "left", "upper", "large", {"x": 0.45, "y": -0.4, "radius": 0.1})
    small, large = (render_study(anat, acq, [nodule], n) for n in (32, 128))
    assert small.image.shape == (32, 32) and large.image.shape == (128, 128)
    # Same anatomy at two sizes: the downsampled large image resembles the small one.
    pooled = large.image.reshape(32, 4, 32, 4).mean(axis=(1, 3))
    assert np.corrcoef(pooled.ravel(), small.image.ravel())[0, 1] > 0.9
    assert abs(small.masks["Nodule"].sum() * 16 - large.masks["Nodule"].sum()) < 0.25 * large.masks["Nodule"].sum()


@pytest.mark.parametrize(
    "kwargs",
    [{"subjects": 0}, {"studies_per_subject": (3, 1)}, {"image_size": 8}, {"seed": -1},
     {"split_fractions": (0.5, 0.2, 0.2)}],
)
def test_bad_parameters_raise_config_error(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ConfigError, match="synth"):
        generate(tmp_path, progress=False, **kwargs)
