"""MAE recipe: overfits one batch, every parameter gets a gradient, trains and evaluates end to end."""
from __future__ import annotations

import json

import pytest
import torch

from medvlp.cli import main
from medvlp.config import load_config
from medvlp.data.sample import Batch
from medvlp.errors import ConfigError
from medvlp.hub import build_method
from tests.conftest import TINY

RECIPE = "configs/methods/mae.yaml"


def _method(tiny_dataset, tmp_path, *extra):
    cfg = load_config(RECIPE, [*TINY, f"data.manifest={tiny_dataset}", f"train.output_dir={tmp_path / 'run'}",
                               "method.decoder_width=16", "method.decoder_heads=2", "method.decoder_depth=1", *extra])
    torch.manual_seed(0)
    return build_method(cfg, None)


def _batch():
    g = torch.Generator().manual_seed(0)
    return Batch(images=torch.randn(4, 1, 32, 32, generator=g))


def test_every_parameter_gets_a_gradient(tiny_dataset, tmp_path):
    method = _method(tiny_dataset, tmp_path)
    method(_batch())["loss"].backward()
    missing = [n for n, p in method.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_overfits_one_batch(tiny_dataset, tmp_path):
    method = _method(tiny_dataset, tmp_path)
    opt = torch.optim.AdamW(method.parameters(), lr=3e-3)
    batch, losses = Batch(images=_batch().images[:2]), []
    for _ in range(150):
        torch.manual_seed(1)  # the same mask every step: a pure memorisation task
        loss = method(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_loss_only_sees_masked_patches(tiny_dataset, tmp_path):
    method = _method(tiny_dataset, tmp_path).eval()
    torch.manual_seed(3)
    pred, mask = method.reconstruct(_batch().images)
    assert pred.shape == (4, 16, 64) and mask.sum(1).tolist() == [12.0] * 4


def test_bad_mask_ratio_is_a_config_error(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match="method.mask_ratio"):
        _method(tiny_dataset, tmp_path, "method.mask_ratio=1.0")


def test_pretrain_then_evaluate(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", RECIPE, *TINY, f"data.manifest={tiny_dataset}", f"train.output_dir={run}",
                 "data.train_split=pretrain", "train.steps=3", "method.decoder_width=16", "method.decoder_heads=2"]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())["run"]
    assert set(m["meta"]["skipped_tasks"]) == {"zeroshot", "retrieval"} and len(m["linear_probe"]["fractions"]) == 3
