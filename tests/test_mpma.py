"""MPMA recipe: M3AE + memory slots + global/local alignment + hard-negative ITM. Gradients,
memory slots, the local word mask, hard negatives, overfitting, config errors, unmasked
encoders for evaluation, and pretrain + evaluate end to end (zero-shot and retrieval run)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from medvlp.cli import main
from medvlp.errors import ConfigError
from medvlp.losses.matching import sample_hard_negatives
from tests.conftest import TINY
from tests.test_m3ae import SMALL, _method_and_batch

RECIPE = "configs/methods/mpma.yaml"


def _mpma(dataset, tmp_path, *extra):
    return _method_and_batch(dataset, tmp_path, "method.memory_slots=4", *extra, recipe=RECIPE)


@pytest.mark.parametrize("variant", ["mgca", "gloria"])
def test_every_parameter_gets_a_gradient(tiny_dataset, tmp_path, variant):
    method, batch, _ = _mpma(tiny_dataset, tmp_path, f"method.local_variant={variant}")
    out = method(batch)
    assert set(out) == {"loss", "loss_mim", "loss_mlm", "loss_global", "loss_local", "loss_itm", "logit_scale"}
    out["loss"].backward()
    missing = [n for n, p in method.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_memory_slots_get_gradient_and_change_the_fused_report(tiny_dataset, tmp_path):
    method, batch, _ = _mpma(tiny_dataset, tmp_path)
    assert method.fusion.memory.shape == (4, 32)
    method.eval()
    torch.manual_seed(0)
    views = method.masked_views(batch)
    _, fused_txt = method.fusion(views.image_seq, views.text_seq, views.text_padding)
    fused_txt.pow(2).sum().backward()
    assert method.fusion.memory.grad.abs().sum() > 0
    with torch.no_grad():
        method.fusion.memory.add_(torch.randn_like(method.fusion.memory))
        _, fused_txt2 = method.fusion(views.image_seq, views.text_seq, views.text_padding)
    assert not torch.allclose(fused_txt, fused_txt2, atol=1e-4)


def test_itm_negatives_follow_the_global_similarity(tiny_dataset, tmp_path, monkeypatch):
    method, batch, _ = _mpma(tiny_dataset, tmp_path)
    b = len(batch)
    captured = {}

    def spy(sim, same, **kw):
        captured["sim"] = sim
        return sample_hard_negatives(sim, same, **kw)

    import medvlp.methods.m3ae as m3ae_module

    monkeypatch.setattr(m3ae_module, "sample_hard_negatives", spy)
    torch.manual_seed(0)
    method(batch)
    torch.manual_seed(0)  # the same masks: recompute the masked-view embeddings by hand
    views = method.masked_views(batch)
    img = F.normalize(method.image_proj(views.vision.pooled), dim=-1)
    txt = F.normalize(method.text_proj(views.text.pooled), dim=-1)
    expected = img @ txt.t() * method.scale()
    assert captured["sim"].shape == (b, b) and not captured["sim"].requires_grad
    torch.testing.assert_close(captured["sim"], expected.detach(), rtol=1e-4, atol=1e-4)


def test_local_alignment_skips_mlm_targets(tiny_dataset, tmp_path, monkeypatch):
    method, batch, _ = _mpma(tiny_dataset, tmp_path, "method.text_mask_prob=0.5")
    seen = {}
    import medvlp.methods.mpma as mpma_module

    def spy(words, word_mask, patches, **kw):
        seen["mask"] = word_mask
        return words.sum() * 0.0 + patches.sum() * 0.0

    monkeypatch.setattr(mpma_module, "mgca_local_loss", spy)
    torch.manual_seed(0)
    views = method.masked_views(batch)
    method._local_loss(batch, views)
    target = views.mlm_labels != -100
    real = batch.word_ids >= 0
    # rows that kept some unmasked word: exactly the real words that are not MLM targets
    keep_rows = (real & ~target).any(dim=1)
    assert target.any() and keep_rows.any()
    assert torch.equal(seen["mask"][keep_rows], (real & ~target)[keep_rows])
    assert torch.equal(seen["mask"][~keep_rows], real[~keep_rows])


def test_evaluation_encoders_are_unmasked(tiny_dataset, tmp_path):
    method, batch, _ = _mpma(tiny_dataset, tmp_path)
    method.eval()
    with torch.no_grad():
        a, b = method.encode_image(batch.images), method.encode_image(batch.images)
        expected = F.normalize(method.image_proj(method.vision(batch.images).pooled), dim=-1)
        t = method.encode_text(batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, expected)
    assert t.shape == (len(batch), 32) and torch.allclose(t.norm(dim=-1), torch.ones(len(batch)))
    assert method.supports_text


def test_overfits_one_batch(tiny_dataset, tmp_path):
    method, batch, _ = _mpma(tiny_dataset, tmp_path)
    opt = torch.optim.AdamW(method.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        torch.manual_seed(1)  # the same masks and negatives every step
        loss = method(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize("override, key", [
    ("method.local_variant=fancy", "method.local_variant"),
    ("method.global_weight=0", "method.global_weight"),
    ("method.local_weight=-0.5", "method.local_weight"),
    ("method.memory_slots=-1", "method.memory_slots"),
    ("method.text_mask_prob=0.7", "method.text_mask_prob"),
    ("method.init_temperature=2", "method.init_temperature"),
])
def test_bad_config_names_the_key(tiny_dataset, tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        _mpma(tiny_dataset, tmp_path, override)


def test_pretrain_then_evaluate(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", RECIPE, *TINY, f"data.manifest={tiny_dataset}", f"train.output_dir={run}",
                 "data.train_split=pretrain", "train.steps=3", *SMALL, "method.memory_slots=4"]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())["run"]
    assert not m["meta"].get("skipped_tasks") and {"zeroshot", "retrieval", "linear_probe"} <= set(m)
