"""MaskedCLIP: the MKD loss by hand, the EMA teacher (unit and through the real loop), every
parameter learns, one batch is memorised, unpaired samples stay out of CLIP, image-only batches
train, config errors, and pretrain on a paired + unpaired mix then evaluate end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch

from medvlp.cli import main
from medvlp.config import load_config
from medvlp.data.mixed import MixedStream, read_sources
from medvlp.data.tokenize import train_wordpiece
from medvlp.data.transforms import Preprocess
from medvlp.errors import ConfigError
from medvlp.hub import build_method, load_bundle
from medvlp.losses.distill import masked_feature_distill
from medvlp.models.ema import EmaTeacher, cosine_momentum
from medvlp.train.optim import param_groups
from tests.conftest import TINY

RECIPE = "configs/methods/maskedclip.yaml"
SMALL = ["method.decoder_width=16", "method.decoder_heads=2", "method.decoder_depth=1",
         "method.feature_decoder_width=16", "method.feature_decoder_heads=2", "method.feature_decoder_depth=1",
         "method.bridge_depth=1", "model.text.dropout=0.0"]
MIX = "data.sources=[{split: pretrain, kind: paired, weight: 3}, {split: pretrain-unpaired, kind: unpaired, weight: 1}]"


def _cfg(tiny_dataset, tmp_path, *extra):
    return load_config(RECIPE, [*TINY, *SMALL, f"data.manifest={tiny_dataset}", f"train.output_dir={tmp_path / 'run'}",
                                MIX, *extra])


def _setup(tiny_dataset, tmp_path, *extra):
    """A method and one mixed batch of 8 from the real stream: 6 paired, then 2 unpaired."""
    cfg = _cfg(tiny_dataset, tmp_path, *extra)
    sources = read_sources(cfg)
    tok = train_wordpiece([s.text() for src in sources if src.kind == "paired" for s in src.samples], 300)
    stream = MixedStream(sources, Preprocess.from_config(cfg), tok, [], batch_size=8, max_length=48,
                         sections=cfg.data.sections, seed=0, augment=False)
    batch = next(iter(stream))
    torch.manual_seed(0)
    return build_method(cfg, tok), batch


def _run(method, batch, seed=1):
    torch.manual_seed(seed)  # the same masks for calls that are compared
    return method(batch)


# ---------------------------------------------------------------------------- the MKD loss
def test_mkd_loss_known_answers():
    pred = torch.tensor([[[3.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])  # scale does not matter
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.6, 0.8]]])
    # cosines 1, 0, (0.6 + 0.8) / sqrt(2); hidden positions only
    cos3 = 1.4 / math.sqrt(2)
    assert masked_feature_distill(pred, target, torch.tensor([[1.0, 1.0, 1.0]])).item() == pytest.approx((0 + 1 + 1 - cos3) / 3)
    assert masked_feature_distill(pred, target, torch.tensor([[0.0, 1.0, 0.0]])).item() == pytest.approx(1.0)
    # smooth-L1 (beta 0.1) on unit vectors, summed over channels: |d| - 0.05 for |d| >= 0.1
    p, t, hide = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]), torch.tensor([[[0.0, 1.0], [0.6, 0.8]]]), torch.ones(1, 2)
    got = masked_feature_distill(p, t, hide, kind="smooth_l1", beta=0.1).item()
    assert got == pytest.approx(((0.95 + 0.95) + (0.35 + 0.75)) / 2)
    # small differences: 0.5 d^2 / beta per channel
    t2 = torch.tensor([[[1.0, 0.0], [math.cos(0.05), math.sin(0.05)]]])
    d = torch.tensor([1 - math.cos(0.05), math.sin(0.05)])
    got = masked_feature_distill(p, t2, torch.tensor([[0.0, 1.0]]), kind="smooth_l1", beta=0.1).item()
    assert got == pytest.approx((0.5 * d.pow(2) / 0.1).sum().item(), rel=1e-5)
    # the target gets no gradient; nothing masked gives zero
    pred_g, target_g = pred.clone().requires_grad_(), target.clone().requires_grad_()
    masked_feature_distill(pred_g, target_g, torch.ones(1, 3)).backward()
    assert pred_g.grad.abs().sum() > 0 and target_g.grad is None
    assert masked_feature_distill(pred, target, torch.zeros(1, 3)).item() == 0.0


# ---------------------------------------------------------------------------- the EMA teacher
def test_teacher_update_is_exact_gets_no_gradient_and_stays_in_eval(tiny_dataset, tmp_path):
    method, batch = _setup(tiny_dataset, tmp_path, "method.ema_momentum=0.9", "method.ema_schedule=constant")
    teacher_params = list(method.teacher.parameters())
    assert teacher_params and all(not p.requires_grad for p in teacher_params)
    grouped = {id(p) for g in param_groups(method, 0.1) for p in g["params"]}
    assert not grouped & {id(p) for p in teacher_params}
    method.train()
    assert method.vision.training and not method.teacher.training and not method.teacher.module.vision.training
    _run(method, batch)["loss"].backward()
    assert all(p.grad is None for p in teacher_params)
    # move the student, then one update: teacher = m * old + (1 - m) * student, every parameter
    with torch.no_grad():
        for p in method.vision.parameters():
            p.add_(torch.randn_like(p))
    old = [p.clone() for p in teacher_params]
    student = list(method._student_branch().parameters())
    method.after_optimizer_step(0)
    assert method.teacher.updates == 1
    for t, o, s in zip(teacher_params, old, student):
        assert torch.allclose(t, 0.9 * o + 0.1 * s, atol=1e-6, rtol=0)
    assert not torch.equal(teacher_params[0], old[0])


def test_teacher_moves_once_per_optimizer_step_in_the_training_loop(tiny_dataset, tmp_path, monkeypatch):
    """The real loop with 2 micro-batches per step: 3 updates (not 6), at the cosine momentum,
    each exactly m * teacher + (1 - m) * student; the checkpoint holds the last teacher."""
    calls = []
    original = EmaTeacher.update

    def recording_update(self, student, momentum=None):
        before = self.module.vision.patch_embed.weight.clone()
        original(self, student, momentum)
        s = student.vision.patch_embed.weight
        calls.append((momentum, torch.allclose(self.module.vision.patch_embed.weight,
                                               momentum * before + (1 - momentum) * s, atol=1e-7, rtol=0),
                      self.module.vision.patch_embed.weight.clone(), s.clone()))

    monkeypatch.setattr(EmaTeacher, "update", recording_update)
    run = tmp_path / "run"
    assert main(["pretrain", "--config", RECIPE, *TINY, *SMALL, f"data.manifest={tiny_dataset}",
                 f"train.output_dir={run}", MIX, "train.steps=3", "train.accum_steps=2", "data.batch_size=4",
                 "method.ema_momentum=0.5"]) == 0
    assert [c[0] for c in calls] == pytest.approx([cosine_momentum(s, 3, 0.5) for s in range(3)])
    assert all(c[1] for c in calls)
    sd = load_bundle(run).method.state_dict()
    assert torch.equal(sd["teacher.module.vision.patch_embed.weight"], calls[-1][2])
    assert torch.equal(sd["vision.patch_embed.weight"], calls[-1][3])
    assert not torch.equal(calls[-1][2], calls[-1][3])  # a lagging copy, not the student


# ---------------------------------------------------------------------------- training behaviour
def test_every_parameter_gets_a_gradient(tiny_dataset, tmp_path):
    method, batch = _setup(tiny_dataset, tmp_path)
    assert batch.has_text.tolist() == [True] * 6 + [False] * 2
    method.train()
    out = _run(method, batch)
    out["loss"].backward()
    assert out["n_paired"].item() == 6 and all(out[k].item() > 0 for k in ("loss_mim", "loss_clip", "loss_mkd"))
    teacher = {id(p) for p in method.teacher.parameters()}
    missing = [n for n, p in method.named_parameters()
               if id(p) not in teacher and (not p.requires_grad or p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())


def test_overfits_one_batch(tiny_dataset, tmp_path):
    method, batch = _setup(tiny_dataset, tmp_path, "model.vision.width=64", "model.text.width=64")
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=2e-3)
    terms = []
    for step in range(80):
        out = _run(method, batch)  # the same masks every step: a memorisation task
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        method.after_optimizer_step(step)
        terms.append({k: v.item() for k, v in out.items()})
    first, last = terms[0], terms[-1]
    assert last["loss"] < 0.5 * first["loss"], (first, last)
    assert first["loss_clip"] == pytest.approx(math.log(6), rel=0.1) and last["loss_clip"] < 0.1  # 6 paired
    assert last["loss_mim"] < first["loss_mim"] and last["loss_mkd"] < first["loss_mkd"]


def test_unpaired_samples_do_not_enter_clip(tiny_dataset, tmp_path):
    method, batch = _setup(tiny_dataset, tmp_path)
    method.eval()
    with torch.no_grad():
        base = _run(method, batch)
        changed = batch.to("cpu")
        changed.input_ids = batch.input_ids.clone()
        changed.input_ids[6:, 1:5] = 7  # the unpaired samples' placeholder ids and texts
        changed.texts = [*batch.texts[:6], "FINDINGS: something else", "FINDINGS: else"]
        assert _run(method, changed)["loss_clip"].item() == base["loss_clip"].item()
        changed.input_ids[0, 1:5] = 7  # a paired sample's report does count
        assert _run(method, changed)["loss_clip"].item() != pytest.approx(base["loss_clip"].item())


def test_a_batch_of_unpaired_images_trains_mim_and_mkd(tiny_dataset, tmp_path):
    method, batch = _setup(tiny_dataset, tmp_path)
    batch.has_text = torch.zeros(len(batch), dtype=torch.bool)
    method.train()
    out = _run(method, batch)
    out["loss"].backward()
    assert out["n_paired"].item() == 0 and out["loss_clip"].item() == 0.0
    assert out["loss"].item() == pytest.approx(out["loss_mim"].item() + out["loss_mkd"].item())
    for module in (method.vision, method.image_decoder, method.feature_decoder):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    # CLIP's parameters get an exact zero (not None: DDP needs every parameter used)
    assert all(p.grad is not None and not p.grad.any() for p in method.text.parameters())


@pytest.mark.parametrize("override, key", [
    ("method.mask_ratio=1.0", "method.mask_ratio"),
    ("method.feature_decoder_width=15", "method.feature_decoder_width"),
    ("method.bridge_depth=0", "method.bridge_depth"),
    ("method.ema_momentum=1.5", "method.ema_momentum"),
    ("method.mkd_loss=l2", "method.mkd_loss"),
    ("method.clip_weight=-1", "method.clip_weight"),
])
def test_bad_config_names_the_key(tiny_dataset, tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        _cfg(tiny_dataset, tmp_path, override)


def test_pretrain_on_a_paired_unpaired_mix_then_evaluate(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", RECIPE, *TINY, *SMALL, f"data.manifest={tiny_dataset}",
                 f"train.output_dir={run}", MIX, "train.steps=3"]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss_mkd" in r]
    assert logged and all(r["n_paired"] == 6 and r["loss_clip"] > 0 for r in logged)
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())["run"]
    assert 0.0 <= m["zeroshot"]["mean"] <= 1.0
    assert set(m["retrieval"]["image_to_text"]) == {"R@1", "R@5", "R@10"}
    assert len(m["linear_probe"]["fractions"]) == 3 and m["linear_probe"]["features"] == "image_features"
