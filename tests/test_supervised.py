"""The supervised ceiling: masked BCE, overfitting one batch, gradients, and a tiny
pretrain -> ``medvlp evaluate`` round trip (image tasks only, plus the head's AUROC)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from medvlp.cli import main
from medvlp.config import load_config
from medvlp.data.loader import Collator, ImageTextDataset
from medvlp.data.manifest import read_info, read_manifest
from medvlp.data.sample import MISSING, NEGATIVE, POSITIVE, UNCERTAIN
from medvlp.data.tokenize import train_wordpiece
from medvlp.data.transforms import Preprocess
from medvlp.hub import build_method
from medvlp.methods.supervised import Supervised, masked_bce
from medvlp.registry import METHODS
from tests.conftest import TINY

RECIPE = "configs/methods/supervised.yaml"


def _cfg(dataset, tmp_path, *overrides):
    return load_config(RECIPE, [*TINY, f"data.manifest={dataset}", f"train.output_dir={tmp_path / 'run'}",
                                "data.augment=false", *overrides])


def _batch(cfg, n=8):
    samples = read_manifest(cfg.data.manifest, [cfg.data.train_split])[:n]
    classes = read_info(cfg.data.manifest)["classes"]
    ds = ImageTextDataset(samples, Preprocess.from_config(cfg), train=False, augment=False)
    tok = train_wordpiece([s.text() for s in samples], 300)  # the collator tokenises reports; the method ignores them
    return Collator(samples, tok, classes, max_length=cfg.model.text.max_length)([ds[i] for i in range(len(samples))])


def test_masked_bce_hand_computed():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 1.0]])
    codes = torch.tensor([[POSITIVE, MISSING], [NEGATIVE, UNCERTAIN]])

    def sp(x: float) -> float:  # softplus: BCE(z, y=1) = sp(-z), BCE(z, y=0) = sp(z)
        return math.log1p(math.exp(x))

    # ignore: only (0,0) positive at z=0 and (1,0) negative at z=-1 count; MISSING never does
    assert masked_bce(logits, codes).item() == pytest.approx((sp(0.0) + sp(-1.0)) / 2, abs=1e-6)
    assert masked_bce(logits, codes, "positive").item() == pytest.approx((sp(0.0) + sp(-1.0) + sp(-1.0)) / 3, abs=1e-6)
    assert masked_bce(logits, codes, "negative").item() == pytest.approx((sp(0.0) + sp(-1.0) + sp(1.0)) / 3, abs=1e-6)


def test_masked_bce_no_valid_entry_is_zero_with_graph():
    logits = torch.randn(3, 4, requires_grad=True)
    loss = masked_bce(logits, torch.full((3, 4), MISSING))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros(3, 4))


def test_registered_and_builds_without_tokenizer(tiny_dataset, tmp_path):
    assert "supervised" in METHODS
    cfg = _cfg(tiny_dataset, tmp_path)
    method = build_method(cfg, None)
    assert isinstance(method, Supervised) and not hasattr(method, "text")
    assert method.head_classes == read_info(tiny_dataset)["classes"]
    assert method.head.out_features == len(method.head_classes)
    with pytest.raises(NotImplementedError, match="no text encoder"):
        method.encode_text(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))


def test_every_parameter_gets_a_gradient(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tmp_path)
    torch.manual_seed(0)
    method = build_method(cfg, None)
    out = method(_batch(cfg))
    out["loss"].backward()
    assert set(out) == {"loss", "loss_bce", "valid_label_fraction"}
    missing = [n for n, p in method.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f"parameters without gradient: {missing}"


def test_overfits_one_batch(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tmp_path)
    torch.manual_seed(0)
    method = build_method(cfg, None)
    batch = _batch(cfg)
    opt = torch.optim.AdamW(method.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(60):
        loss = method(batch)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = method(batch)["loss"].item()
    assert final < 0.05 < first, (first, final)


def test_pretrain_then_evaluate(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", RECIPE, *TINY, f"data.manifest={tiny_dataset}", f"train.output_dir={run}",
                 "train.steps=3", "data.batch_size=4"]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--random-init", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("run", "random-init"):
        m = metrics[name]
        assert "zeroshot" not in m and "retrieval" not in m
        assert set(m["meta"]["skipped_tasks"]) == {"zeroshot", "retrieval"}
        assert m["linear_probe"]["features"] == "image_features"
        assert len(m["linear_probe"]["fractions"]) == 3
        head = m["supervised_head"]
        assert 0.0 <= head["mean"] <= 1.0 and set(head["per_class"]) == set(read_info(tiny_dataset)["classes"])
    report = (out / "report.md").read_text()
    assert "own classification head: mean AUROC" in report and "zeroshot skipped (image-only model" in report
    assert "run" in capsys.readouterr().out
