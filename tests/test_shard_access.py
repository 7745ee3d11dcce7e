"""Shard-backed samples (manifest ``image: null`` + ``meta.shard`` / ``meta.key``) read like PNG files:
member access, clear errors, and ``medvlp evaluate`` giving the same numbers from shards as from files."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from medvlp.cli import main
from medvlp.data import shard_access
from medvlp.data.loader import check_images_exist
from medvlp.data.manifest import read_manifest, write_manifest
from medvlp.data.shard_access import (
    ShardMember,
    image_ref,
    load_sample_image,
    mask_source,
    read_member,
)
from medvlp.data.shards import INDEX_NAME, iter_shard
from medvlp.data.transforms import load_image
from medvlp.errors import DataError
from tests.conftest import TINY


def sharded_copy(src, dst):
    """``dst``: the dataset ``src`` (written with --shards) as ``medvlp prepare`` lays it out: only
    shards/, and manifest rows with ``image: null`` and meta.shard / meta.key / meta.mask = members."""
    shutil.copytree(src / "shards", dst / "shards")
    shutil.copy(src / "dataset.json", dst / "dataset.json")
    where = {}
    for entry in json.loads((src / "shards" / INDEX_NAME).read_text()):
        for rec in iter_shard(src / "shards" / entry["file"]):
            where[rec["__key__"]] = (entry["file"], rec)
    rows = []
    for line in (src / "manifest.jsonl").read_text().splitlines():
        row = json.loads(line)
        key = row["id"].replace(".", "_").replace("/", "_")
        shard, rec = where[key]
        assert rec["png"] == (src / row["image"]).read_bytes()  # the shard holds the file's exact bytes
        row["image"] = None
        row["meta"].update(shard=shard, key=key)
        if row["meta"].get("mask"):
            row["meta"]["mask"] = f"{key}.mask.png"
        rows.append(json.dumps(row, sort_keys=True))
    (dst / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    return dst


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base = tmp_path_factory.mktemp("shardacc")
    files = base / "files"
    assert main(["synth", "--out", str(files), "--subjects", "24", "--image-size", "32", "--shards",
                 "--shard-size", "7", "--no-progress"]) == 0
    return files, sharded_copy(files, base / "sharded")


def test_manifest_resolves_shards_and_members_equal_files(pair):
    files, sharded = pair
    a, b = read_manifest(files), read_manifest(sharded)
    assert [s.id for s in a] == [s.id for s in b] and all(s.image is None for s in b)
    for fs, ss in zip(a, b):
        ref = image_ref(ss)
        assert isinstance(ref, ShardMember) and ref.shard == str(sharded / "shards" / ss.meta["shard"])
        assert np.array_equal(load_sample_image(ss), load_image(fs.image))  # bit-identical pixels
        if fs.meta.get("mask"):
            m_file = np.asarray(Image.open(mask_source(fs, files)))
            assert np.array_equal(np.asarray(Image.open(mask_source(ss, sharded))), m_file)
    check_images_exist(b)
    # the resolved path is machine-specific: never written back
    write_manifest(sharded / "copy", b[:2], {"name": "x"})
    assert "shard_path" not in (sharded / "copy" / "manifest.jsonl").read_text()


def test_missing_shard_member_and_truncated_shard_are_clear_errors(pair, tmp_path):
    _, sharded = pair
    s = read_manifest(sharded)[0]
    ghost = s.__class__(**{**s.__dict__, "meta": dict(s.meta, key="nope")})
    with pytest.raises(DataError, match=r"has no member 'nope\.png'.*Fix:"):
        load_sample_image(ghost)
    with pytest.raises(DataError, match=r"1 of 2 images are missing, e\.g\. .*nope\.png"):
        check_images_exist([s, ghost])
    lost = s.__class__(**{**s.__dict__, "meta": dict(s.meta, shard_path=str(tmp_path / "gone.tar"))})
    with pytest.raises(DataError, match=r"shard not found: .*gone\.tar.*medvlp prepare"):
        load_sample_image(lost)
    # a shard cut short after indexing: the read notices the missing bytes
    cut = tmp_path / "cut.tar"
    shutil.copy(s.meta["shard_path"], cut)
    ref = ShardMember(str(cut), f"{s.meta['key']}.png")
    good = read_member(ref)  # indexes the intact shard
    offset, size = shard_access.INDEX.table(str(cut))[ref.name]
    with open(cut, "r+b") as fh:
        fh.truncate(offset + size // 2)
    with pytest.raises(DataError, match=r"member truncated .*cut short"):
        read_member(ref)
    assert len(good) == size


def test_index_is_bounded_lru(pair):
    _, sharded = pair
    idx = shard_access._Index(max_shards=2)
    names = sorted(p for p in (sharded / "shards").glob("*.tar"))
    assert len(names) >= 3
    for p in names:
        idx.table(str(p))
    assert list(idx.tables) == [str(p) for p in names[-2:]]


def test_evaluate_same_numbers_from_shards_as_from_files(pair, tmp_path):
    files, sharded = pair
    run = tmp_path / "run"
    assert main(["pretrain", "--config", "configs/experiments/demo.yaml", *TINY, f"data.manifest={files}",
                 f"train.output_dir={run}", "train.steps=3"]) == 0
    tasks = "zeroshot,linear_probe,segmentation,detection"
    results = {}
    for name, data in (("files", files), ("shards", sharded)):
        out = tmp_path / f"eval-{name}"
        assert main(["evaluate", str(run), "--data", str(data), "--tasks", tasks, "--out", str(out),
                     "--overrides", "eval.fractions=[1.0]"]) == 0
        text = (out / "metrics.json").read_text().replace(str(out), "OUT")  # split-file paths name the folder
        results[name] = json.loads(text)["run"]
    for task in ("zeroshot", "linear_probe", "segmentation", "detection"):
        assert task in results["files"], task
        assert results["shards"][task] == results["files"][task], task
    assert results["files"]["detection"] != results["files"]["zeroshot"]  # real, task-specific numbers


def test_pretrain_from_shard_backed_manifest_equals_png_folder(pair, tmp_path):
    """Without data.shards the manifest loader reads shard members (in 2 worker processes) and
    trains exactly as from the PNG files."""
    losses = {}
    for name, data in zip(("files", "shards"), pair):
        run = tmp_path / name
        assert main(["pretrain", "--config", "configs/experiments/demo.yaml", *TINY, f"data.manifest={data}",
                     f"train.output_dir={run}", "train.steps=3", "data.num_workers=2"]) == 0
        losses[name] = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses["files"]) == 3 and losses["shards"] == losses["files"]
