"""Uni-Mlip recipe: SimCSE masking, feature noise, gradients, overfitting, branch switches, end to end."""
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
from medvlp.models.augment import feature_noise
from tests.conftest import TINY
from tests.test_m3ae import _one_batch

RECIPE = "configs/methods/unimlip.yaml"


def _method_and_batch(dataset, tmp_path, *extra):
    cfg = load_config(RECIPE, [*TINY, f"data.manifest={dataset}", f"train.output_dir={tmp_path / 'run'}",
                               "data.train_split=train", *extra])
    tok, batch = _one_batch(cfg)
    torch.manual_seed(0)
    return build_method(cfg, tok), batch


def test_nt_xent_pair_keys_remove_identical_negatives():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    z2 = z1.clone()
    # samples 1 and 2 share a key: their cross logits go, sample 0 keeps all its negatives
    keyed = nt_xent(z1, z2, tau=0.5, pair_keys=torch.tensor([7, 3, 3]))
    # rows of samples 1 / 2: positive cos 1, negatives only sample 0's two views (cos 0)
    row12 = -(2.0 - math.log(math.exp(2.0) + 2))
    # rows of sample 0: positive cos 1, four negatives with cos 0
    row0 = -(2.0 - math.log(math.exp(2.0) + 4))
    assert keyed.item() == pytest.approx((2 * row0 + 4 * row12) / 6, rel=1e-6)
    assert keyed.item() < nt_xent(z1, z2, tau=0.5).item()


def test_feature_noise_is_relative_and_differentiable():
    x = torch.randn(256, 64) * 10
    x.requires_grad_(True)
    y = feature_noise(x, 0.1, generator=torch.Generator().manual_seed(0))
    rel = ((y - x).std() / x.std()).item()
    assert rel == pytest.approx(0.1, rel=0.1)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_every_parameter_gets_a_gradient_and_terms_add_up(tiny_dataset, tmp_path):
    method, batch = _method_and_batch(tiny_dataset, tmp_path)
    assert method.text_dropout_passes  # the default tower has dropout: SimCSE runs two real passes
    out = method(batch)
    terms = {"clip": 1.0, "feat": 1.0, "ssl": 1.0, "txt_ssl": 0.5, "itm": 1.0, "mlm": 1.0}
    assert {f"loss_{k}" for k in terms} <= set(out)
    assert out["loss"].item() == pytest.approx(sum(w * out[f"loss_{k}"].item() for k, w in terms.items()), rel=1e-5)
    out["loss"].backward()
    assert [n for n, p in method.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_overfits_one_batch(tiny_dataset, tmp_path):
    # a dropout-free tower: SimCSE takes its two views from dropout on the pooled features
    method, batch = _method_and_batch(tiny_dataset, tmp_path, "model.text.dropout=0.0")
    assert not method.text_dropout_passes
    opt = torch.optim.AdamW(method.parameters(), lr=2e-3)
    losses = []
    for _ in range(50):
        torch.manual_seed(1)  # the same views, noise, masks and negatives every step
        out = method(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert out["loss_txt_ssl"].item() > 0
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize("key, term, module", [
    ("feat_weight", "feat", None), ("ssl_weight", "ssl", "ssl_head"), ("txt_ssl_weight", "txt_ssl", None),
    ("itm_weight", "itm", "itm_head"), ("mlm_weight", "mlm", "mlm_head"),
])
def test_a_zero_weight_turns_its_branch_off(tiny_dataset, tmp_path, key, term, module):
    method, batch = _method_and_batch(tiny_dataset, tmp_path, f"method.{key}=0")
    rows = {}
    method.vision.register_forward_hook(lambda m, a, o: rows.__setitem__("vision", a[0].shape[0]))
    method.text.register_forward_hook(lambda m, a, o: rows.__setitem__("text", a[0].shape[0]))
    out = method(batch)
    assert f"loss_{term}" not in out and "loss_clip" in out
    if module is not None:
        assert getattr(method, module) is None
    b = len(batch)
    assert rows["vision"] == (b if key == "ssl_weight" else 2 * b)  # the second view only for NT-Xent
    assert rows["text"] == {"txt_ssl_weight": 2 * b, "mlm_weight": 2 * b}.get(key, 3 * b)
    out["loss"].backward()  # what is left still trains


def test_without_itm_and_mlm_there_is_no_fusion(tiny_dataset, tmp_path):
    method, batch = _method_and_batch(tiny_dataset, tmp_path, "method.itm_weight=0", "method.mlm_weight=0")
    assert method.fusion is None and not any(n.startswith("fusion") for n, _ in method.named_parameters())
    assert not {"loss_itm", "loss_mlm"} & set(method(batch))


@pytest.mark.parametrize("override, key", [
    ("method.feat_noise_std=0", "method.feat_noise_std"), ("method.mlm_weight=-1", "method.mlm_weight"),
    ("method.txt_ssl_temperature=0", "method.txt_ssl_temperature"), ("method.txt_feat_dropout=1.0", "method.txt_feat_dropout"),
    ("method.text_mask_prob=0.9", "method.text_mask_prob"), ("method.ssl_temperature=0", "method.ssl_temperature"),
])
def test_bad_config_names_the_key(tiny_dataset, tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        _method_and_batch(tiny_dataset, tmp_path, override)


def test_pretrain_then_evaluate(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", RECIPE, *TINY, f"data.manifest={tiny_dataset}", f"train.output_dir={run}",
                 "data.train_split=pretrain", "train.steps=2"]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all({"loss_feat", "loss_ssl", "loss_txt_ssl", "loss_itm", "loss_mlm"} <= set(r) for r in rows if "loss" in r)
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())["run"]
    assert {"zeroshot", "retrieval", "linear_probe"} <= set(m)
