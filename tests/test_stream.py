"""Shard streaming: rank x worker assignment with documented padding, determinism, per-batch
source mix, corrupt members skipped and named, shards equal to the PNG folder, train loop wiring."""
from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from medvlp.data.loader import ImageTextDataset
from medvlp.data.manifest import read_manifest
from medvlp.data.shards import write_shards
from medvlp.data.stream import (
    ShardDataset,
    ShardSource,
    ShardStream,
    epoch_segments,
    iter_members,
    part_size,
    read_shard_index,
    read_shard_sources,
)
from medvlp.data.tokenize import train_wordpiece
from medvlp.data.transforms import Preprocess

PRE = Preprocess(32)
CLASSES = ["No Finding", "Cardiomegaly"]


@pytest.fixture(scope="module")
def shard_set(tiny_dataset, tmp_path_factory):
    """23 'pretrain' samples in shards of 5 (5, 5, 5, 5, 3; odd total: one padding sample on
    2 ranks) and 10 'train' samples in shards of 5."""
    out = tmp_path_factory.mktemp("shards")
    pre = read_manifest(tiny_dataset, ["pretrain"])[:23]
    lab = read_manifest(tiny_dataset, ["train"])[:10]
    write_shards(pre + lab, out, root=tiny_dataset, shard_size=5)
    return out, {s.id: s for s in pre + lab}


def _source(folder, split, kind="paired", weight=1.0):
    folder, index = read_shard_index(folder)
    return ShardSource(split, kind, weight, [], [(str(folder / e["file"]), e["rows"]) for e in index if e["split"] == split])


def _epoch_ids(ds, role, workers, epoch=0):
    size = part_size(ds.sources[0].rows, rank=ds.rank, world=ds.world, worker=role, num_workers=workers)
    it = ds.source_records(0, role, workers, epoch)
    return [next(it)[1] for _ in range(size)]


def _stream(sources, **kw):
    tok = train_wordpiece(["findings normal heart lungs clear effusion"] * 4, 100)
    kw = {"batch_size": 4, "seed": 5, "augment": False, "shuffle_buffer": 4, **kw}
    return ShardStream(sources, PRE, tok, CLASSES, max_length=32, sections=("findings", "impression"), **kw)


def test_every_sample_on_exactly_one_rank_and_worker_apart_from_padding(shard_set):
    folder, _ = shard_set
    src = _source(folder, "pretrain")
    keys = {k for path, _ in src.shards for k, _ in iter_members(path)}
    assert len(keys) == 23
    for epoch in (0, 1):
        seen = {}
        for rank in range(2):
            ds = ShardDataset([src], PRE, batch_size=4, seed=1, world=2, rank=rank, shuffle_buffer=3)
            for worker in range(2):
                seen[rank, worker] = _epoch_ids(ds, worker, 2, epoch)
        assert sum(len(v) for v in seen.values()) == 24  # both ranks: ceil(23 / 2) = 12 samples
        assert len(seen[0, 0]) + len(seen[0, 1]) == len(seen[1, 0]) + len(seen[1, 1]) == 12
        counts = Counter(k for v in seen.values() for k in v)
        assert set(counts) == keys
        repeated = [k for k, n in counts.items() if n > 1]
        assert len(repeated) == 1 and counts[repeated[0]] == 2
        # documented padding: the first sample of the epoch's shard order, read again by the last rank
        shard, first, _ = epoch_segments([n for _, n in src.shards], seed=1, source=0, epoch=epoch,
                                         rank=0, world=2, worker=0, num_workers=2)[0]
        first_key = next(iter_members(src.shards[shard][0], first, first + 1))[0]
        assert repeated == [first_key]
        assert first_key in seen[0, 0] and first_key in seen[1, 1]


def test_real_dataloader_two_ranks_two_workers_cover_the_epoch(shard_set):
    folder, by_id = shard_set
    src = _source(folder, "pretrain")
    ids = []
    for rank in range(2):
        stream = _stream([src], rank=rank, world=2, num_workers=2, batch_size=3)
        it = iter(stream)
        batches = [next(it) for _ in range(4)]  # 12 samples = this rank's share of the epoch
        ids += [i for b in batches for i in b.ids]
    counts = Counter(ids)
    assert set(counts) == {i for i, s in by_id.items() if s.split == "pretrain"}
    assert sorted(counts.values()) == [1] * 22 + [2]


def test_same_seed_and_epoch_same_order_other_epoch_other_order(shard_set):
    folder, _ = shard_set
    src = _source(folder, "pretrain")
    a = ShardDataset([src], PRE, batch_size=4, seed=9, shuffle_buffer=6)
    b = ShardDataset([src], PRE, batch_size=4, seed=9, shuffle_buffer=6)
    assert _epoch_ids(a, 0, 1, 0) == _epoch_ids(b, 0, 1, 0)
    assert _epoch_ids(a, 0, 1, 0) != _epoch_ids(a, 0, 1, 1)
    assert sorted(_epoch_ids(a, 0, 1, 0)) == sorted(_epoch_ids(a, 0, 1, 1))
    other_seed = ShardDataset([src], PRE, batch_size=4, seed=10, shuffle_buffer=6)
    assert _epoch_ids(a, 0, 1, 0) != _epoch_ids(other_seed, 0, 1, 0)


def test_weights_give_fixed_counts_per_batch_and_resume_is_exact(shard_set):
    folder, by_id = shard_set
    sources = [_source(folder, "pretrain", "paired", 3.0), _source(folder, "train", "labeled", 1.0)]
    stream = _stream(sources, batch_size=8, num_workers=2)
    it = iter(stream)
    batches = [next(it) for _ in range(6)]
    for b in batches:
        splits = Counter(by_id[i].split for i in b.ids)
        assert splits == {"pretrain": 6, "train": 2}
        assert b.has_text.tolist() == [True] * 6 + [False] * 2  # labeled samples lose their report
    assert stream.position == 6
    assert stream.epochs()["train/labeled"] == pytest.approx(6 * 2 / 10)
    resumed = _stream(sources, batch_size=8, num_workers=2, position=3)
    again = iter(resumed)
    for b in batches[3:]:
        r = next(again)
        assert r.ids == b.ids and torch.equal(r.images, b.images)


def _rewrite_with_truncated_png(path: Path, victim: int) -> str:
    members = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            members.append((m.name, tar.extractfile(m).read()))
    pngs = [n for n, _ in members if n.endswith(".png") and not n.endswith(".mask.png")]
    bad = pngs[victim]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            data = data[: len(data) // 2] if name == bad else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return bad.split(".")[0]


def test_truncated_png_member_is_skipped_and_named(shard_set, tmp_path, tiny_dataset):
    _, by_id = shard_set
    samples = [s for s in by_id.values() if s.split == "train"]
    write_shards(samples, tmp_path, root=tiny_dataset, shard_size=5)
    shard = tmp_path / "shard-train-000000.tar"
    key = _rewrite_with_truncated_png(shard, 2)
    stream = _stream([_source(tmp_path, "train")], batch_size=5, shuffle_buffer=1)
    it = iter(stream)
    batches = [next(it) for _ in range(2)]  # one epoch: both shards
    skipped = [m for b in batches for m in b.skipped]
    assert len(skipped) == 1 and shard.name in skipped[0] and key in skipped[0] and "cannot read image" in skipped[0]
    assert sum(len(b) for b in batches) == 9


def test_truncated_tar_skips_the_rest_of_the_shard_with_a_message(shard_set, tmp_path, tiny_dataset):
    _, by_id = shard_set
    samples = [s for s in by_id.values() if s.split == "train"]
    write_shards(samples, tmp_path, root=tiny_dataset, shard_size=10)
    shard = tmp_path / "shard-train-000000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    stream = _stream([_source(tmp_path, "train")], batch_size=10, shuffle_buffer=1)
    batch = next(iter(stream))
    assert batch.skipped and all(shard.name in m for m in batch.skipped)
    assert len(batch) + len(batch.skipped) == 10


def test_synth_shards_read_back_equal_to_png_folder(tmp_path):
    from medvlp.cli import main

    out = tmp_path / "synth"
    main(["synth", "--out", str(out), "--subjects", "6", "--image-size", "32", "--shards", "--shard-size", "4",
          "--workers", "1", "--no-progress"])
    samples = read_manifest(out)
    folder, index = read_shard_index(out)
    assert sum(e["rows"] for e in index) == len(samples)
    png = ImageTextDataset(samples, PRE, train=False, augment=False)
    pos = {s.id: i for i, s in enumerate(samples)}
    ds = ShardDataset([ShardSource("x", "paired", 1.0, [], [])], PRE, batch_size=1, seed=0, augment=False)
    seen = 0
    for entry in index:
        for key, members in iter_members(folder / entry["file"]):
            sample, _, x, err = ds.decode(0, (entry["file"], key, members, 0))
            ref = samples[pos[sample.id]]
            assert err is None and torch.equal(x, png[pos[sample.id]][1])
            assert (sample.text(), sample.labels, sample.subject_id, sample.view) == (
                ref.text(), ref.labels, ref.subject_id, ref.view)
            seen += 1
    assert seen == len(samples)


def test_pretrain_from_shards(tiny_cfg, shard_set):
    from medvlp.train.loop import pretrain

    folder, _ = shard_set
    cfg = tiny_cfg(f"data.shards={folder}", "train.steps=2", "data.batch_size=4", "data.shuffle_buffer=8")
    assert read_shard_sources(cfg)[0].rows == 23
    path = pretrain(cfg)
    assert (path / "model.safetensors").is_file()


def _ids(items) -> list[str]:
    return [s.id for s, _, _, _ in items]


def _gloo_worker(rank: int, port: int, folder: str, out_path: str) -> None:
    import json
    import os

    os.environ.update(OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from medvlp.distributed import init_distributed

    rank, world, _ = init_distributed("gloo")
    # ShardDataset in a real DataLoader (no tokenizer: keeps transformers out of the spawned processes)
    ds = ShardDataset([_source(folder, "pretrain")], PRE, batch_size=3, seed=5, rank=rank, world=world, shuffle_buffer=4)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, collate_fn=_ids,
                                         multiprocessing_context="fork")
    it = iter(loader)
    ids = [i for _ in range(4) for i in next(it)]  # 4 x 3 = this rank's 12 samples of the epoch
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, ids)
    if rank == 0:
        Path(out_path).write_text(json.dumps(gathered))
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_split_the_epoch(shard_set, tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    folder, by_id = shard_set
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ids.json"
    mp.start_processes(_gloo_worker, args=(port, str(folder), str(out)), nprocs=2, join=True, start_method="spawn")
    per_rank = json.loads(out.read_text())
    assert [len(ids) for ids in per_rank] == [12, 12]
    counts = Counter(per_rank[0] + per_rank[1])
    assert set(counts) == {i for i, s in by_id.items() if s.split == "pretrain"}
    assert sorted(counts.values()) == [1] * 22 + [2]
