"""Training: every parameter learns, one batch can be overfit, resume is exact,
corrupt images are skipped and counted, checkpoints hold no pickles."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from medvlp.data.loader import make_loader
from medvlp.data.manifest import read_info, read_manifest
from medvlp.data.tokenize import train_wordpiece
from medvlp.hub import build_method
from medvlp.train import checkpoint as ckpt_mod
from medvlp.train import loop
from medvlp.train.optim import build_optimizer, build_scheduler


def _one_batch(cfg, n=8):
    samples = read_manifest(cfg.data.manifest, ["train"])
    classes = read_info(cfg.data.manifest)["classes"]
    tok = train_wordpiece([s.text() for s in samples], cfg.model.text.vocab_size)
    # distinct subjects and report texts, so each pair has exactly one positive
    seen, chosen = set(), []
    for s in samples:
        if s.text() not in seen and s.subject_id not in seen:
            seen.update((s.text(), s.subject_id))
            chosen.append(s)
        if len(chosen) == n:
            break
    batch = next(iter(make_loader(chosen, cfg, tok, classes, batch_size=n)))
    return tok, batch


def test_every_trainable_parameter_gets_a_gradient(tiny_cfg):
    cfg = tiny_cfg("model.text.dropout=0.0")
    tok, batch = _one_batch(cfg)
    torch.manual_seed(0)
    method = build_method(cfg, tok)
    method.train()
    method(batch)["loss"].backward()
    missing = [n for n, p in method.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f"parameters without gradient: {missing}"


def test_overfit_one_batch(tiny_cfg):
    # width 32 with [CLS] pooling is too small to memorise 8 reports that share most words
    cfg = tiny_cfg("model.text.dropout=0.0", "train.lr=1e-3", "train.weight_decay=0.0", "train.steps=300",
                   "train.warmup_steps=20", "model.vision.width=64", "model.text.width=64", "model.text.depth=2")
    tok, batch = _one_batch(cfg)
    torch.manual_seed(0)
    method = build_method(cfg, tok)
    opt = build_optimizer(method, cfg.train, torch.device("cpu"))
    sched = build_scheduler(opt, cfg.train)
    losses = []
    for _ in range(cfg.train.steps):
        loss = method(batch)["loss"]
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(method.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
    method.eval()
    with torch.no_grad():
        sim = method.encode_image(batch.images) @ method.encode_text(batch.input_ids, batch.attention_mask).T
    assert losses[0] == pytest.approx(math.log(len(batch)), rel=0.1)  # chance level at init
    assert max(losses[-10:]) < 0.05 * losses[0]
    assert torch.equal(sim.argmax(1), torch.arange(len(batch)))


def test_resume_after_interruption_equals_uninterrupted(tiny_cfg, tmp_path, monkeypatch):
    common = ["train.steps=6", "train.save_every=3", "model.text.dropout=0.1", "train.keep_checkpoints=5"]
    full = loop.pretrain(tiny_cfg(*common, f"train.output_dir={tmp_path / 'a'}"))

    real_save = ckpt_mod.save_checkpoint

    def crash_after_first_save(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(ckpt_mod, "save_checkpoint", crash_after_first_save)
    cfg_b = tiny_cfg(*common, f"train.output_dir={tmp_path / 'b'}")
    with pytest.raises(KeyboardInterrupt):
        loop.pretrain(cfg_b)
    monkeypatch.setattr(ckpt_mod, "save_checkpoint", real_save)
    assert [p.name for p in ckpt_mod.list_checkpoints(tmp_path / "b")] == ["step_00000003"]
    resumed = loop.pretrain(cfg_b, resume=True)

    a, b = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    la = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    assert [r["step"] for r in lb] == list(range(1, 7))


def test_checkpoint_is_safetensors_and_json_only(tiny_cfg):
    path = loop.pretrain(tiny_cfg("train.steps=2"))
    names = sorted(p.name for p in path.iterdir())
    for required in ("model.safetensors", "config.json", "tokenizer", "optimizer.safetensors", "trainer_state.json",
                     "pretrain_subjects.json", "text_config"):
        assert required in names
    for f in path.rglob("*"):
        if f.is_file():
            assert f.suffix in (".safetensors", ".json", ".txt"), f
    config = json.loads((path / "config.json").read_text())
    assert config["preprocess"]["image_size"] == 32 and config["classes"]
    seen = json.loads((path / "pretrain_subjects.json").read_text())
    assert all(len(h) == 64 for h in seen["sha256"])  # hashed, never raw ids
    cfg = tiny_cfg()
    expected = {s.meta["image_sha256"] for s in read_manifest(cfg.data.manifest, ["pretrain"])}
    assert set(seen["image_sha256"]) == expected  # pixel hashes of exactly the pre-training images


def test_corrupt_image_is_skipped_and_listed(tiny_dataset, tiny_cfg, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    victim = read_manifest(data, ["pretrain"])[0].image
    with open(victim, "wb") as fh:
        fh.write(b"not a png")
    cfg = tiny_cfg(f"data.manifest={data}", "train.steps=8")
    loop.pretrain(cfg)
    listed = (tmp_path / "run" / "skipped.txt").read_text()
    assert victim in listed


def test_fresh_run_refuses_a_folder_with_checkpoints(tiny_cfg):
    from medvlp.errors import ConfigError

    loop.pretrain(tiny_cfg("train.steps=1"))
    with pytest.raises(ConfigError, match="already holds checkpoints.*--resume"):
        loop.pretrain(tiny_cfg("train.steps=1"))


def test_image_cache_is_exact_bounded_and_off_by_default(tiny_dataset):
    from medvlp.data.manifest import read_manifest, resolve_manifest
    from medvlp.data.transforms import ImageCache, Preprocess, load_image, to_tensor

    paths = [s.image for s in read_manifest(resolve_manifest(tiny_dataset))][:3]
    pre = Preprocess(image_size=32)
    off = ImageCache(0)
    assert off.get(paths[0], pre) is not off.get(paths[0], pre) and not off.entries
    one_image_mb = 32 * 32 * 4 / 2**20
    cache = ImageCache(2.5 * one_image_mb)  # room for two prepared images
    first = cache.get(paths[0], pre)
    assert torch.equal(first, to_tensor(load_image(paths[0]), pre))
    assert cache.get(paths[0], pre) is first  # a hit returns the stored tensor
    for p in paths[1:]:
        cache.get(p, pre)
    assert len(cache.entries) == 2 and cache.used <= cache.budget  # full: the third is read, not kept
    assert torch.equal(cache.get(paths[2], pre), to_tensor(load_image(paths[2]), pre))
    assert cache.get(paths[0], Preprocess(image_size=16)).shape[-1] == 16  # keyed by the preprocessing too


def test_worker_count_does_not_change_training(tiny_cfg, tmp_path):
    # the default loader has one worker process; augmentation is seeded per (seed, epoch, sample),
    # so the weights after training are those of in-process loading, bit for bit
    runs = [loop.pretrain(tiny_cfg("train.steps=4", f"data.num_workers={n}", f"train.output_dir={tmp_path / str(n)}"))
            for n in (0, 1)]
    a, b = (load_file(str(r / "model.safetensors")) for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
