"""SLIP recipe: NT-Xent known answer, medical-safe views, gradients, overfitting, end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch

from medvlp.cli import main
from medvlp.config import load_config
from medvlp.errors import ConfigError
from medvlp.hub import build_method
from medvlp.losses.selfsup import nt_xent
from medvlp.models.augment import ViewConfig, random_view
from tests.conftest import TINY
from tests.test_m3ae import _one_batch

RECIPE = "configs/methods/slip.yaml"


def _method_and_batch(dataset, tmp_path, *extra, recipe=None):
    cfg = load_config(RECIPE, [*TINY, f"data.manifest={dataset}", f"train.output_dir={tmp_path / 'run'}",
                               "data.train_split=train", *extra])
    tok, batch = _one_batch(cfg)
    torch.manual_seed(0)
    return build_method(cfg, tok), batch, tok


OFF = {"max_rotation": 0.0, "scale": (1.0, 1.0), "max_shift": 0.0, "contrast": (1.0, 1.0), "gamma": (1.0, 1.0), "noise_std": 0.0}


def test_nt_xent_known_answer():
    z1, z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # row 0 (view 1 of sample 0): cosines to [z1_1, z2_0, z2_1] = [0, 1, 0]; the positive is z2_0
    expected = -(1 / 0.5 - math.log(math.exp(0) + math.exp(1 / 0.5) + math.exp(0)))
    assert nt_xent(z1, z2, tau=0.5).item() == pytest.approx(expected, rel=1e-6)  # every row is alike
    assert nt_xent(z1, z2[[1, 0]], tau=0.5).item() > nt_xent(z1, z2, tau=0.5).item()


def test_views_are_seeded_mild_and_flip_free_by_default():
    x = torch.rand(16, 1, 32, 32) * 2 - 1
    a = random_view(x, generator=torch.Generator().manual_seed(0))
    b = random_view(x, generator=torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.allclose(a, x)
    same = random_view(x, ViewConfig(**OFF))
    assert torch.allclose(same, ((x * 0.25 + 0.5).clamp(0, 1) - 0.5) / 0.25, atol=1e-5)
    # a left-right asymmetric image: with flips on some views are mirrored, with the default none
    img = torch.zeros(16, 1, 32, 32)
    img[..., :8] = 1.0
    flipped = random_view(img, ViewConfig(**OFF, hflip=True), generator=torch.Generator().manual_seed(1))
    left_bright = flipped[..., :8].mean((1, 2, 3)) > flipped[..., -8:].mean((1, 2, 3))
    assert 0 < int(left_bright.sum()) < 16
    plain = random_view(img, ViewConfig(**OFF), generator=torch.Generator().manual_seed(1))
    assert bool((plain[..., :8].mean((1, 2, 3)) > plain[..., -8:].mean((1, 2, 3))).all())
    # a grey image copied to 3 channels stays grey: every channel gets the same noise, and a
    # 1-channel view draws the same noise as before channels shared it
    grey = torch.rand(4, 1, 16, 16).expand(4, 3, 16, 16)
    noisy = random_view(grey, ViewConfig(**{**OFF, "noise_std": 0.1}), generator=torch.Generator().manual_seed(2))
    assert torch.equal(noisy[:, 0], noisy[:, 1]) and torch.equal(noisy[:, 1], noisy[:, 2])
    one = random_view(grey[:, :1], ViewConfig(**{**OFF, "noise_std": 0.1}), generator=torch.Generator().manual_seed(2))
    assert torch.allclose(one[:, 0], noisy[:, 0], atol=1e-6) and not torch.allclose(one, grey[:, :1], atol=1e-3)


def test_every_parameter_gets_a_gradient_and_the_ssl_term_is_logged(tiny_dataset, tmp_path):
    method, batch, _ = _method_and_batch(tiny_dataset, tmp_path)
    out = method(batch)
    assert {"loss", "loss_clip", "loss_ssl"} <= set(out)
    assert out["loss"].item() == pytest.approx(out["loss_clip"].item() + out["loss_ssl"].item(), rel=1e-5)
    out["loss"].backward()
    assert [n for n, p in method.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_overfits_one_batch(tiny_dataset, tmp_path):
    method, batch, _ = _method_and_batch(tiny_dataset, tmp_path, "model.text.dropout=0.0")
    opt = torch.optim.AdamW(method.parameters(), lr=2e-3)
    losses = []
    for _ in range(60):
        torch.manual_seed(1)  # the same two views every step
        loss = method(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_bad_config_names_the_key(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match="method.ssl_temperature"):
        _method_and_batch(tiny_dataset, tmp_path, "method.ssl_temperature=0")


def test_pretrain_then_evaluate(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", RECIPE, *TINY, f"data.manifest={tiny_dataset}", f"train.output_dir={run}",
                 "data.train_split=pretrain", "train.steps=2"]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_ssl" in r for r in rows if "loss" in r)
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())["run"]
    assert {"zeroshot", "retrieval", "linear_probe"} <= set(m)


def test_zero_ssl_weight_is_clip_without_the_head_or_the_view_passes(tiny_dataset, tmp_path):
    """ssl_weight 0 builds no SimCLR head (no parameter left without a gradient) and skips the two
    view passes: the loss is the CLIP term alone."""
    method, batch, _ = _method_and_batch(tiny_dataset, tmp_path, "method.ssl_weight=0")
    assert method.ssl_head is None
    calls = []
    method.vision.register_forward_hook(lambda *_: calls.append(1))
    out = method(batch)
    assert "loss_ssl" not in out and out["loss"].item() == out["loss_clip"].item() and len(calls) == 1
    out["loss"].backward()
    assert [n for n, p in method.named_parameters() if p.grad is None] == []
