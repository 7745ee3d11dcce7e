"""M3AE recipe: ITM pair construction (known answers), MLM targets, gradients, overfitting,
config errors, and pretrain + evaluate end to end (linear probe only)."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from medvlp.cli import main
from medvlp.config import load_config
from medvlp.data.masking import IGNORE
from medvlp.errors import ConfigError
from medvlp.hub import build_method
from medvlp.methods.m3ae import itm_pairs
from tests.conftest import TINY
from tests.test_train import _one_batch

RECIPE = "configs/methods/m3ae.yaml"
SMALL = ["model.text.dropout=0.0", "method.decoder_width=16", "method.decoder_heads=2", "method.decoder_depth=1"]


def _cfg(dataset, tmp_path, *extra, recipe=RECIPE):
    return load_config(recipe, [*TINY, f"data.manifest={dataset}", f"train.output_dir={tmp_path / 'run'}",
                                "data.train_split=train", *SMALL, *extra])


def _method_and_batch(dataset, tmp_path, *extra, recipe=RECIPE):
    cfg = _cfg(dataset, tmp_path, *extra, recipe=recipe)
    tok, batch = _one_batch(cfg)
    torch.manual_seed(0)
    return build_method(cfg, tok), batch, tok


def test_itm_pairs_known_answer():
    # image 1 and report 2 have no valid negative (-1): they are left out
    image_index, text_index, target = itm_pairs(torch.tensor([2, -1, 0]), torch.tensor([1, 2, -1]))
    assert image_index.tolist() == [0, 1, 2, 0, 2, 1, 2]
    assert text_index.tolist() == [0, 1, 2, 2, 0, 0, 1]
    assert target.tolist() == [1, 1, 1, 0, 0, 0, 0]


@pytest.mark.parametrize("memory_slots", [0, 3])
def test_fusion_first_token_only_equals_position_zero(memory_slots):
    # the ITM negatives pass computes only the [CLS] rows in the last fusion layer
    from medvlp.models.fusion import FusionEncoder

    torch.manual_seed(0)
    fusion = FusionEncoder(16, depth=2, heads=2, memory_slots=memory_slots).eval()
    img, txt = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, 4:] = padding[2, 6:] = True
    full_img, full_txt = fusion(img, txt, padding)
    first_img, first_txt = fusion(img, txt, padding, first_token_only=True)
    assert first_img.shape == (3, 1, 16) and first_txt.shape == (3, 1, 16)
    torch.testing.assert_close(first_img, full_img[:, :1])
    torch.testing.assert_close(first_txt, full_txt[:, :1])


def test_identical_reports_are_never_itm_negatives(tiny_dataset, tmp_path):
    method, batch, _ = _method_and_batch(tiny_dataset, tmp_path)
    texts = list(batch.texts)
    texts[1] = texts[2] = texts[3] = texts[0].upper()  # the same report, up to case
    batch = replace(batch, texts=texts)
    group, b = {0, 1, 2, 3}, len(batch)
    assert b >= 6 and len({t.lower() for t in texts}) == b - 3
    for seed in range(20):
        torch.manual_seed(seed)
        image_index, text_index, target = method.itm_pairs_for(batch, None)
        assert target.tolist() == [1] * b + [0] * (2 * b)  # every sample still has a true negative
        assert (image_index[:b] == text_index[:b]).all()
        for i, k in zip(image_index[b:].tolist(), text_index[b:].tolist()):
            assert i != k and not (i in group and k in group)


def test_no_true_negative_leaves_only_the_positives(tiny_dataset, tmp_path):
    method, batch, _ = _method_and_batch(tiny_dataset, tmp_path)
    batch = replace(batch, texts=["the same report"] * len(batch))
    image_index, text_index, target = method.itm_pairs_for(batch, None)
    b = len(batch)
    assert target.tolist() == [1] * b and image_index.tolist() == text_index.tolist() == list(range(b))
    assert torch.isfinite(method(batch)["loss_itm"])


def test_mlm_targets_are_never_special_tokens(tiny_dataset, tmp_path):
    method, batch, tok = _method_and_batch(tiny_dataset, tmp_path, "method.text_mask_prob=0.5")
    specials = torch.tensor(tok.all_special_ids)
    torch.manual_seed(0)
    views = method.masked_views(batch)
    target = views.mlm_labels != IGNORE
    assert target.sum() > 0
    assert not torch.isin(batch.input_ids[target], specials).any()
    assert (batch.word_ids[target] >= 0).all()
    assert (views.mlm_labels[target] == batch.input_ids[target]).all()
    # the [CLS] + visible patches reach the fusion: 16 patches at 32 px / 8 px, 75 % hidden
    b = len(batch)
    assert views.image_seq.shape[:2] == (b, 1 + 4) and views.vision.mask.sum(1).tolist() == [12.0] * b


def test_every_parameter_gets_a_gradient(tiny_dataset, tmp_path):
    method, batch, _ = _method_and_batch(tiny_dataset, tmp_path)
    out = method(batch)
    assert set(out) == {"loss", "loss_mim", "loss_mlm", "loss_itm"}
    out["loss"].backward()
    missing = [n for n, p in method.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_itm_off_drops_the_head(tiny_dataset, tmp_path):
    method, batch, _ = _method_and_batch(tiny_dataset, tmp_path, "method.itm_weight=0")
    assert method.itm_head is None and "loss_itm" not in method(batch)


def test_overfits_one_batch(tiny_dataset, tmp_path):
    method, batch, _ = _method_and_batch(tiny_dataset, tmp_path)
    opt = torch.optim.AdamW(method.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        torch.manual_seed(1)  # the same image mask, MLM mask and negatives every step
        loss = method(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_image_only_samples_are_rejected(tiny_dataset, tmp_path):
    method, batch, _ = _method_and_batch(tiny_dataset, tmp_path)
    has_text = batch.has_text.clone()
    has_text[0] = False
    with pytest.raises(ValueError, match="report for every sample"):
        method(replace(batch, has_text=has_text))


@pytest.mark.parametrize("override, key", [
    ("method.text_mask_prob=0.6", "method.text_mask_prob"),
    ("method.mask_ratio=1.0", "method.mask_ratio"),
    ("method.itm_weight=-1", "method.itm_weight"),
    ("method.fusion_width=30", "method.fusion_width"),
    ("method.fusion_heads=3", "method.fusion_heads"),  # the default fusion width 32 (text width) / 3
])
def test_bad_config_names_the_key(tiny_dataset, tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        _method_and_batch(tiny_dataset, tmp_path, override)


def test_pretrain_then_evaluate(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", RECIPE, *TINY, f"data.manifest={tiny_dataset}", f"train.output_dir={run}",
                 "data.train_split=pretrain", "train.steps=3", *SMALL]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())["run"]
    assert set(m["meta"]["skipped_tasks"]) == {"zeroshot", "retrieval"} and len(m["linear_probe"]["fractions"]) == 3


def check_fused_vqa_features(method, batch) -> torch.Tensor:
    """The fusion models' VQA features (FusionHeads.vqa_features): the fused [CLS] pair, each half
    depending on the other modality; returns them (eval mode, no gradient)."""
    method.eval()
    with torch.no_grad():
        feats = method.vqa_features(batch.images, batch.input_ids, batch.attention_mask)
        width = method.image_to_fusion.out_features
        assert feats.shape == (len(batch), 2 * width) and torch.isfinite(feats).all()
        # the fused image half changes with the question and the question half with the image
        flipped = method.vqa_features(batch.images.flip(0), batch.input_ids, batch.attention_mask)
        assert not torch.allclose(flipped[:, width:], feats[:, width:])
        other_q = method.vqa_features(batch.images, batch.input_ids.flip(0), batch.attention_mask.flip(0))
        assert not torch.allclose(other_q[:, :width], feats[:, :width])
    return feats


def test_vqa_features_are_the_fused_cls_pair_and_depend_on_both_inputs(tiny_dataset, tmp_path):
    method, batch, _ = _method_and_batch(tiny_dataset, tmp_path)
    check_fused_vqa_features(method, batch)


@pytest.mark.parametrize("recipe", [RECIPE, "configs/methods/mpma.yaml"])
def test_itm_on_whole_inputs_fuses_the_unmasked_pairs(tiny_dataset, tmp_path, recipe):
    """``itm_inputs: whole``: the ITM term is the head's cross-entropy on the whole images and the
    unmasked reports (the same pairs as the masked term, by the same seed), and it trains the head."""
    import torch.nn.functional as F

    method, batch, _ = _method_and_batch(tiny_dataset, tmp_path, "method.itm_inputs=whole", recipe=recipe)
    method.eval()  # no dropout: the hand-computed loss below must see the same forward
    torch.manual_seed(3)
    got = method(batch)["loss_itm"]
    torch.manual_seed(3)
    views = method.masked_views(batch)  # draws the masks first, as forward does, so the pairs match
    _, _, sim = method._alignment(batch, views)
    image_index, text_index, target = method.itm_pairs_for(batch, sim)
    with torch.no_grad():
        image_seq = method.fusion_image_inputs(batch.images)
        text_seq, padding = method.fusion_text_inputs(batch.input_ids, batch.attention_mask)
        logits = method.itm_head(method.fused_pair(image_seq[image_index], text_seq[text_index],
                                                   None if padding is None else padding[text_index]))
    assert torch.allclose(got, F.cross_entropy(logits.float(), target), atol=1e-5)
    method.train()
    method(batch)["loss"].backward()
    assert method.itm_head.fc.weight.grad.abs().sum() > 0
