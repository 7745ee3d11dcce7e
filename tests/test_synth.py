"""SynthCXR dataset writing: determinism, splits, masks vs labels, reports vs labels, VQA, shards."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medvlp.data.manifest import read_info, read_manifest
from medvlp.data.sample import NEGATIVE, POSITIVE
from medvlp.data.shards import iter_shard
from medvlp.data.synth import CLASSES, GENERATOR_VERSION, generate
from medvlp.data.synth.generator import (
    PRESETS,
    REPORT_SPLITS,
    SPLITS,
    assign_splits,
    decode_mask,
    frozen_versions,
    mask_bits,
)
from medvlp.data.synth.reports import report_contract
from medvlp.data.synth.vqa import OPEN_ANSWERS
from medvlp.errors import ConfigError

SIZE = 64


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    generate(out, subjects=40, studies_per_subject=(1, 3), image_size=SIZE, seed=7, progress=False,
             shards=True, shard_size=16)
    return out


def test_same_seed_gives_identical_bytes_with_any_worker_count(dataset: Path, tmp_path: Path) -> None:
    again = generate(tmp_path / "b", subjects=40, studies_per_subject=(1, 3), image_size=SIZE, seed=7,
                     progress=False, workers=2, shards=True, shard_size=16)
    assert again == tmp_path / "b" / "manifest.jsonl"
    first, second = _files(dataset), _files(tmp_path / "b")
    assert first.keys() == second.keys() and len(first) > 80
    assert first == second


def test_different_seed_differs(dataset: Path, tmp_path: Path) -> None:
    generate(tmp_path / "c", subjects=40, studies_per_subject=(1, 3), image_size=SIZE, seed=8, progress=False)
    assert (dataset / "manifest.jsonl").read_bytes() != (tmp_path / "c" / "manifest.jsonl").read_bytes()
    first = np.asarray(Image.open(dataset / "images" / "S00000" / "S00000-T00.png"))
    other = np.asarray(Image.open(tmp_path / "c" / "images" / "S00000" / "S00000-T00.png"))
    assert not np.array_equal(first, other)


def test_manifest_images_and_info(dataset: Path) -> None:
    samples = read_manifest(dataset)
    info = read_info(dataset)
    assert info["name"] == "synthcxr" and info["version"] == GENERATOR_VERSION and info["classes"] == CLASSES
    assert info["seed"] == 7 and info["image_size"] == SIZE and info["benchmark"] is None  # custom size
    assert sum(info["split_counts"].values()) == len(samples) and len({s.id for s in samples}) == len(samples)
    for s in samples:
        assert re.fullmatch(r"S\d{5}", s.subject_id) and re.fullmatch(re.escape(s.subject_id) + r"-T\d{2}", s.study_id)
        assert s.view in ("PA", "AP") and s.meta["generator_version"] == GENERATOR_VERSION
        img = Image.open(s.image)
        assert img.mode == "L" and img.size == (SIZE, SIZE)
        import hashlib

        assert hashlib.sha256(np.asarray(img).tobytes()).hexdigest() == s.meta["image_sha256"]
        json.dumps(s.meta)


def test_splits_are_by_subject_and_reports_only_where_paired(dataset: Path) -> None:
    samples = read_manifest(dataset)
    split_of: dict[str, set[str]] = {}
    for s in samples:
        split_of.setdefault(s.subject_id, set()).add(s.split)
        assert s.has_text == (s.split in REPORT_SPLITS), (s.split, s.findings)
    assert all(len(v) == 1 for v in split_of.values())
    assert {next(iter(v)) for v in split_of.values()} == set(SPLITS)  # every split got subjects
    names = assign_splits(1000, 0, {"pretrain": 0.5, "train": 0.3, "test": 0.2})
    assert (names.count("pretrain"), names.count("train"), names.count("test")) == (500, 300, 200)


def test_every_label_matches_the_rendered_masks_and_boxes(dataset: Path) -> None:
    for s in read_manifest(dataset):
        masks = decode_mask(dataset / s.meta["mask"])
        drawn = {f["name"] for f in s.meta["findings"]}
        assert drawn == {c for c in CLASSES[1:] if s.labels[c] == POSITIVE}
        assert (s.labels["No Finding"] == POSITIVE) == (not drawn)
        assert set(s.labels.values()) <= {POSITIVE, NEGATIVE}
        for c in CLASSES[1:]:
            if s.labels[c] == POSITIVE:
                assert masks[c].any(), (s.id, c)
            else:
                assert not masks[c].any(), (s.id, c)
        boxes: dict[str, list] = {}
        for f in s.meta["findings"]:  # one box per finding instance (e.g. each device)
            boxes.setdefault(f["name"], []).append(f["bbox"])
        for name, bb in boxes.items():
            ys, xs = np.nonzero(masks[name])
            b = np.array(bb)
            assert (b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()) == (
                xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), (s.id, name)


def test_mask_bits_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    masks = {c: rng.random((8, 8)) for c in CLASSES[1:]}
    Image.fromarray(mask_bits(masks)).save(tmp_path / "m.png")
    decoded = decode_mask(tmp_path / "m.png")
    for c in CLASSES[1:]:
        assert np.array_equal(decoded[c], masks[c] >= 0.5)
    assert not decoded["No Finding"].any()


def test_every_templated_report_agrees_with_its_labels(dataset: Path) -> None:
    checked = 0
    for s in read_manifest(dataset):
        if s.has_text:
            findings = [f for f in s.meta["findings"]]
            assert report_contract(s.findings, s.impression, findings) == [], (s.id, s.findings, s.impression)
            checked += 1
    assert checked > 30


def test_vqa_answers_are_true_of_the_image(dataset: Path) -> None:
    kinds = set()
    for s in read_manifest(dataset):
        by_name = {f["name"]: f for f in s.meta["findings"]}
        closed = [q for q in s.meta["vqa"] if q["type"] == "closed"]
        assert sum(q["answer"] == "yes" for q in closed) == len(by_name)
        assert sum(q["answer"] == "no" for q in closed) == min(max(1, len(by_name)), len(CLASSES) - 1 - len(by_name))
        for q in s.meta["vqa"]:
            kinds.add(q["kind"])
            if q["kind"] == "presence":
                assert (q["answer"] == "yes") == (q["finding"] in by_name)
            elif q["kind"] in ("side", "zone", "severity"):
                key = q["kind"]
                assert q["answer"] == by_name[q["finding"]][key] and q["answer"] in OPEN_ANSWERS[key]
            elif q["kind"] == "count":
                assert q["answer"] == (str(len(by_name)) if len(by_name) < 4 else "4 or more")
            elif q["kind"] == "which_finding":
                f = by_name[q["finding"]]
                assert f["side"] in q["question"] and f["zone"] in q["question"]
    assert kinds >= {"presence", "side", "severity", "count"}


def test_shards_hold_every_sample_in_order(dataset: Path) -> None:
    index = json.loads((dataset / "shards" / "shards.json").read_text())
    samples = read_manifest(dataset)
    assert sum(e["rows"] for e in index) == len(samples)
    by_split: dict[str, list] = {}
    for entry in index:
        assert entry["rows"] <= 16
        for rec in iter_shard(dataset / "shards" / entry["file"]):
            assert set(rec) == {"__key__", "png", "json", "mask.png"}
            by_split.setdefault(entry["split"], []).append(rec)
    for split, recs in by_split.items():
        expected = [s for s in samples if s.split == split]
        assert [json.loads(r["json"])["id"] for r in recs] == [s.id for s in expected]
        assert recs[0]["png"] == Path(expected[0].image).read_bytes()


def test_presets_and_frozen_versions_are_consistent() -> None:
    assert set(PRESETS) == {"small", "standard", "large"}
    assert PRESETS["large"].subjects * sum(PRESETS["large"].studies_per_subject) / 2 >= 100_000
    for name, frozen in frozen_versions().items():
        assert frozen["preset"] in PRESETS and name.startswith(frozen["preset"] + "-v")
        assert re.fullmatch(r"[0-9a-f]{64}", frozen["manifest_sha256"])


def test_small_preset_reproduces_its_frozen_hash(tmp_path: Path) -> None:
    frozen = frozen_versions().get("small-v1")
    if frozen is None or frozen["generator_version"] != GENERATOR_VERSION:
        pytest.fail("small-v1 is not frozen for this generator version; run benchmarks/freeze_synth.py")
    generate(tmp_path, preset="small", seed=frozen["seed"], progress=False, workers=2)
    info = read_info(tmp_path)
    assert info["manifest_sha256"] == frozen["manifest_sha256"], "the generator's output changed: bump GENERATOR_VERSION"
    assert info["benchmark"] == "small-v1"


@pytest.mark.parametrize(
    "kwargs",
    [{"subjects": 0}, {"studies_per_subject": (3, 1)}, {"image_size": 8}, {"seed": -1},
     {"split_fractions": (0.5, 0.2, 0.2)}, {"split_fractions": {"pretrain": 0.5, "bogus": 0.5}},
     {"split_fractions": {"pretrain": 1.0}}, {"preset": "huge"}, {"workers": -1}],
)
def test_bad_parameters_raise_config_error(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ConfigError, match="synth"):
        generate(tmp_path, progress=False, **kwargs)
