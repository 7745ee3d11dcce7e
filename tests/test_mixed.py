"""Mixed-source stream: exact per-batch mix, one rank per sample per epoch, flags, resume."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from medvlp.config import SourceConfig
from medvlp.data.mixed import MixedStream, batch_counts, read_sources
from medvlp.data.sample import MISSING
from medvlp.data.tokenize import train_wordpiece
from medvlp.data.transforms import Preprocess
from medvlp.errors import ConfigError, DataError


def test_batch_counts_proportional_exact_and_at_least_one():
    assert batch_counts([3, 1], 8) == [6, 2]
    assert batch_counts([1, 1, 1], 8) == [3, 3, 2]
    assert batch_counts([1], 5) == [5]
    assert batch_counts([100, 1], 8) == [7, 1]  # a tiny weight still gets one sample
    assert sum(batch_counts([0.7, 0.2, 0.1], 64)) == 64 and batch_counts([0.7, 0.2, 0.1], 64) == [45, 13, 6]
    with pytest.raises(ConfigError, match="batch_size"):
        batch_counts([1, 1, 1], 2)


def _sources(tiny_cfg, *specs):
    cfg = tiny_cfg()
    cfg.data.sources = [SourceConfig(split=s, kind=k, weight=w) for s, k, w in specs]
    return cfg, read_sources(cfg)


def _stream(cfg, sources, *, rank=0, world=1, position=0, batch_size=8, paired_labels="manifest"):
    texts = [s.text() for src in sources for s in src.samples if s.has_text]
    tok = train_wordpiece(texts, 200)
    return MixedStream(sources, Preprocess.from_config(cfg), tok, ["No Finding", "Cardiomegaly"], batch_size=batch_size,
                       max_length=32, sections=("findings", "impression"), seed=3, paired_labels=paired_labels,
                       rank=rank, world=world, position=position)


def test_each_sample_of_an_epoch_goes_to_exactly_one_rank(tiny_cfg):
    cfg, sources = _sources(tiny_cfg, ("pretrain", "paired", 3.0), ("pretrain-unpaired", "unpaired", 1.0))
    ranks = [_stream(cfg, sources, rank=r, world=2, batch_size=4) for r in range(2)]
    counts = ranks[0].counts
    assert counts == [3, 1]
    n_paired = len(sources[0].samples)
    # Batches covering the first epoch of the paired source (2 ranks x 3 per batch).
    n_batches = n_paired // (2 * counts[0])
    seen: Counter = Counter()
    for b in range(n_batches):
        for stream in ranks:
            keys = stream.batch_keys(b)
            assert len(keys) == 4
            seen.update(i for i, epoch in keys[: counts[0]] if epoch == 0)
    assert all(v == 1 for v in seen.values()) and len(seen) == n_batches * 2 * counts[0]
    # The smaller source cycles on its own: one unpaired sample per rank per batch, so its
    # second epoch starts after n_unpaired / 2 batches.
    n_unpaired = len(sources[1].samples)
    assert ranks[0].batch_keys(n_unpaired // 2 + 1)[-1][1] == 1


def test_flags_follow_each_sources_kind(tiny_cfg):
    cfg, sources = _sources(tiny_cfg, ("pretrain", "paired", 2.0), ("pretrain-unpaired", "unpaired", 1.0),
                            ("pretrain-labeled", "labeled", 1.0))
    batch = next(iter(_stream(cfg, sources)))
    kinds = ["paired"] * 4 + ["unpaired"] * 2 + ["labeled"] * 2
    assert batch.has_text.tolist() == [k == "paired" for k in kinds]
    assert batch.paired.tolist() == [k == "paired" for k in kinds]
    assert batch.has_labels.tolist() == [k != "unpaired" for k in kinds]
    assert all(t == "" for t, k in zip(batch.texts, kinds) if k != "paired")
    assert all(t.startswith("FINDINGS:") for t, k in zip(batch.texts, kinds) if k == "paired")
    assert (batch.labels[4:6] == MISSING).all() and (batch.labels[6:] != MISSING).all()
    # Paired samples can train without labels (labels only from a labeled source).
    unlabeled = next(iter(_stream(cfg, sources, paired_labels="none")))
    assert (unlabeled.labels[:4] == MISSING).all() and unlabeled.has_labels.tolist()[:4] == [False] * 4


def test_resume_at_a_position_continues_exactly(tiny_cfg):
    cfg, sources = _sources(tiny_cfg, ("pretrain", "paired", 1.0), ("pretrain-unpaired", "unpaired", 1.0))
    full = iter(_stream(cfg, sources))
    first = [next(full) for _ in range(6)]
    resumed = _stream(cfg, sources, position=4)
    it = iter(resumed)
    again = [next(it), next(it)]
    assert resumed.position == 6
    for a, b in zip(first[4:], again):
        assert a.ids == b.ids and (a.images == b.images).all()  # same samples, same augmentation


def test_paired_source_without_reports_and_duplicate_sources_are_refused(tiny_cfg):
    with pytest.raises(DataError, match="no reports"):
        _sources(tiny_cfg, ("pretrain-unpaired", "paired", 1.0))
    with pytest.raises(ConfigError, match="twice"):
        _sources(tiny_cfg, ("pretrain", "paired", 1.0), ("pretrain", "paired", 2.0))
    cfg, sources = _sources(tiny_cfg, ("val", "paired", 1.0))
    with pytest.raises(DataError, match="fewer than"):
        _stream(cfg, sources, batch_size=len(sources[0].samples) + 1)


def test_mixed_sources_are_validated_in_config(tiny_cfg):
    with pytest.raises(ConfigError, match="data.sources\\[0\\].kind"):
        tiny_cfg("data.sources=[{split: pretrain, kind: images}]")
    with pytest.raises(ConfigError, match="weight"):
        tiny_cfg("data.sources=[{split: pretrain, kind: paired, weight: 0}]")
    cfg = tiny_cfg("data.sources=[{split: pretrain, kind: paired, weight: 3}, {split: pretrain-unpaired, kind: unpaired}]")
    assert [s.kind for s in cfg.data.sources] == ["paired", "unpaired"] and isinstance(cfg.data.sources[0].weight, float)


def test_loop_trains_an_image_only_method_on_label_only_sources(tiny_dataset, tmp_path):
    """The stream serves every method: the supervised ceiling learns from two labeled sources
    without any report (its bundle still carries a placeholder tokenizer)."""
    from medvlp.config import load_config
    from medvlp.hub import load_bundle
    from medvlp.train import loop
    from tests.conftest import TINY

    cfg = load_config("configs/methods/supervised.yaml", [
        *TINY, f"data.manifest={tiny_dataset}", f"train.output_dir={tmp_path / 'run'}", "train.steps=2",
        "data.batch_size=4", "data.sources=[{split: train, kind: labeled}, {split: pretrain-labeled, kind: labeled}]"])
    path = loop.pretrain(cfg)
    bundle = load_bundle(path)
    assert bundle.method.head_classes == bundle.classes and len(bundle.pretrain_subject_hashes) > 0
    rows = [json.loads(x) for x in (path.parent.parent / "metrics.jsonl").read_text().splitlines()]
    assert {"epoch/train/labeled", "epoch/pretrain-labeled/labeled"} <= set(rows[-1])


def test_subject_ranges_split_one_split_into_disjoint_parts(tiny_cfg):
    cfg = tiny_cfg()
    cfg.data.sources = [SourceConfig(split="pretrain", kind="paired", subjects=[0.0, 0.5]),
                        SourceConfig(split="pretrain", kind="unpaired", subjects=[0.5, 1.0])]
    paired, unpaired = read_sources(cfg)
    everything = read_sources(tiny_cfg())[0].samples  # data.train_split = pretrain, all subjects
    a, b = {s.subject_id for s in paired.samples}, {s.subject_id for s in unpaired.samples}
    assert a and b and not a & b and a | b == {s.subject_id for s in everything}
    assert len(paired.samples) + len(unpaired.samples) == len(everything)
    cfg.data.sources = [SourceConfig(split="pretrain", kind="paired", subjects=[0.0, 0.6]),
                        SourceConfig(split="pretrain", kind="paired", subjects=[0.5, 1.0])]
    with pytest.raises(ConfigError, match="overlapping"):
        read_sources(cfg)
    with pytest.raises(ConfigError, match="subjects"):
        SourceConfig(split="pretrain", subjects=[0.5, 0.2]).validate("data.sources[0]")
