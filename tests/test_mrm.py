"""MRM recipe: MAE + report MLM conditioned on the image. Gradients reach every parameter, one
batch is memorised, the report prediction depends on the image (and only through the
projection), MLM targets skip special tokens and image-only samples, bad configs are config
errors, and pretrain + evaluate runs end to end (linear probe only)."""
from __future__ import annotations

import json

import pytest
import torch

from medvlp.cli import main
from medvlp.config import load_config
from medvlp.data.masking import IGNORE
from medvlp.data.sample import Batch
from medvlp.data.tokenize import encode_texts, train_wordpiece
from medvlp.errors import ConfigError, DataError
from medvlp.hub import build_method
from tests.conftest import TINY

RECIPE = "configs/methods/mrm.yaml"
REPORTS = ["the heart size is normal and the lungs are clear",
           "there is a small left pleural effusion with basilar atelectasis",
           "moderate cardiomegaly with mild pulmonary edema",
           "no pneumothorax is seen and the lungs are clear"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece(REPORTS * 4, 120)


def _method(tiny_dataset, tmp_path, tokenizer, *extra):
    cfg = load_config(RECIPE, [*TINY, f"data.manifest={tiny_dataset}", f"train.output_dir={tmp_path / 'run'}",
                               "method.decoder_width=16", "method.decoder_heads=2", "method.decoder_depth=1",
                               "model.text.dropout=0.0", *extra])
    torch.manual_seed(0)
    return build_method(cfg, tokenizer)


def _batch(tokenizer, has_text=(True, True, True, False), blank_missing=True):
    g = torch.Generator().manual_seed(0)
    texts = [t if keep or not blank_missing else "" for t, keep in zip(REPORTS, has_text)]
    enc = encode_texts(tokenizer, texts, 48)
    return Batch(images=torch.randn(len(texts), 1, 32, 32, generator=g), input_ids=enc["input_ids"],
                 attention_mask=enc["attention_mask"], word_ids=enc["word_ids"],
                 has_text=torch.tensor(has_text), texts=texts)


def test_every_parameter_gets_a_gradient(tiny_dataset, tmp_path, tokenizer):
    method = _method(tiny_dataset, tmp_path, tokenizer)
    torch.manual_seed(0)
    out = method(_batch(tokenizer))
    assert out["loss_mlm"] > 0 and out["loss_mim"] > 0
    out["loss"].backward()
    missing = [n for n, p in method.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_a_batch_without_reports_has_zero_mlm_but_a_gradient_path(tiny_dataset, tmp_path, tokenizer):
    method = _method(tiny_dataset, tmp_path, tokenizer)
    out = method(_batch(tokenizer, has_text=(False,) * 4))
    assert out["loss_mlm"].item() == 0.0
    out["loss"].backward()
    assert [n for n, p in method.named_parameters() if p.grad is None] == []  # DDP needs every parameter used


def test_loss_is_the_weighted_sum_of_its_terms(tiny_dataset, tmp_path, tokenizer):
    method = _method(tiny_dataset, tmp_path, tokenizer, "method.mim_weight=2.0", "method.mlm_weight=0.5")
    out = method(_batch(tokenizer))
    assert torch.isclose(out["loss"].detach(), 2.0 * out["loss_mim"] + 0.5 * out["loss_mlm"])


def test_overfits_one_batch(tiny_dataset, tmp_path, tokenizer):
    method = _method(tiny_dataset, tmp_path, tokenizer)
    opt = torch.optim.AdamW(method.parameters(), lr=3e-3)
    batch, history = _batch(tokenizer, has_text=(True, True, True, True)), []
    for _ in range(120):
        torch.manual_seed(1)  # the same image and word masks every step: pure memorisation
        out = method(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append((out["loss"].item(), out["loss_mim"].item(), out["loss_mlm"].item()))
    first, last = history[0], history[-1]
    assert last[0] < 0.5 * first[0], (first, last)
    assert last[1] < 0.5 * first[1] and last[2] < 0.5 * first[2], (first, last)  # both halves learn


def test_report_prediction_depends_on_the_image_only_through_the_projection(tiny_dataset, tmp_path, tokenizer):
    method = _method(tiny_dataset, tmp_path, tokenizer).eval()
    batch = _batch(tokenizer, has_text=(True, True, True, True))
    masked, labels = method.mask_report(batch, torch.Generator().manual_seed(0))
    row = 1
    target = labels[row] != IGNORE
    assert target.any()
    ids, attn = masked[row:row + 1].repeat(2, 1), batch.attention_mask[row:row + 1].repeat(2, 1)
    images = batch.images[:2]  # two different radiographs, the same masked report
    noise = torch.rand(1, method.vision.grid_size ** 2).repeat(2, 1)  # the same patches visible

    def masked_logits():
        with torch.no_grad():
            visible = method.vision(images, mask_ratio=method.cfg.mask_ratio, noise=noise).tokens
            hidden = method.report_hidden(ids, attn, method.image_condition(visible))
            return method.mlm_head(hidden[:, target])

    logits = masked_logits()
    assert (logits[0] - logits[1]).abs().max() > 1e-4
    with torch.no_grad():
        method.image_to_text.weight.zero_()
        method.image_to_text.bias.zero_()
    logits = masked_logits()
    torch.testing.assert_close(logits[0], logits[1])


def test_mlm_targets_skip_special_tokens_padding_and_image_only_samples(tiny_dataset, tmp_path, tokenizer):
    method = _method(tiny_dataset, tmp_path, tokenizer, "method.text_mask_prob=0.99")
    # image-only rows keep real token ids here, so only the has_text flag can exclude them
    batch = _batch(tokenizer, has_text=(True, False, True, False), blank_missing=False)
    masked, labels = method.mask_report(batch, torch.Generator().manual_seed(0))
    target = labels != IGNORE
    assert not target[~batch.has_text].any()  # image-only samples are never MLM targets
    assert target[batch.has_text].any()
    assert not target[batch.word_ids < 0].any()  # [CLS] / [SEP] / [PAD] are never targets
    assert (labels[target] == batch.input_ids[target]).all()
    off = ~target & batch.has_text[:, None]
    assert (masked[off] == batch.input_ids[off]).all()  # in reports, only target tokens are corrupted


@pytest.mark.parametrize("override, key", [
    ("method.text_mask_prob=0.0", "method.text_mask_prob"),
    ("method.text_mask_prob=1.0", "method.text_mask_prob"),
    ("method.mlm_weight=-1", "method.mlm_weight"),
    ("method.mim_weight=.nan", "method.mim_weight"),
    ("method.mask_ratio=1.0", "method.mask_ratio"),
    ("method.decoder_heads=3", "method.decoder_width"),
])
def test_bad_config_is_a_config_error(tiny_dataset, tmp_path, tokenizer, override, key):
    with pytest.raises(ConfigError, match=key):
        _method(tiny_dataset, tmp_path, tokenizer, override)


def test_both_weights_zero_is_a_config_error(tiny_dataset, tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="mim_weight / mlm_weight"):
        _method(tiny_dataset, tmp_path, tokenizer, "method.mim_weight=0", "method.mlm_weight=0")


def test_needs_reports_to_train_its_tokenizer(tiny_dataset, tmp_path):
    from medvlp.train.loop import prepare_tokenizer

    cfg = load_config(RECIPE, [*TINY, f"data.manifest={tiny_dataset}"])
    with pytest.raises(DataError, match="no reports"):
        prepare_tokenizer(cfg, [], None)  # an image-only MAE would get a placeholder vocabulary here


def test_pretrain_then_evaluate(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    sources = "data.sources=[{split: pretrain, kind: paired, weight: 3}, {split: pretrain-unpaired, kind: unpaired}]"
    assert main(["pretrain", "--config", RECIPE, *TINY, f"data.manifest={tiny_dataset}", f"train.output_dir={run}",
                 sources, "train.steps=3", "method.decoder_width=16", "method.decoder_heads=2"]) == 0
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_mlm" in r and "loss_mim" in r for r in logged)
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())["run"]
    assert set(m["meta"]["skipped_tasks"]) == {"zeroshot", "retrieval"} and len(m["linear_probe"]["fractions"]) == 3
    from medvlp.hub import load_bundle

    bundle = load_bundle(run)  # a real WordPiece vocabulary trained on the reports, not the image-only placeholder
    assert len(bundle.tokenizer) > 64 and bundle.method.mlm_spec.mask_id == bundle.tokenizer.mask_token_id
