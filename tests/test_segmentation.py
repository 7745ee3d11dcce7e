"""Segmentation task: the decoder's geometry, a constant-token model scoring near zero while
tokens that encode the masks score high, and the task end to end with a tiny CLIP."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medvlp.config import load_config
from medvlp.data.loader import make_loader
from medvlp.data.manifest import read_info, read_manifest
from medvlp.data.tokenize import train_wordpiece
from medvlp.eval.segmentation import (
    POS_WEIGHT_MAX,
    DenseTaskSkipped,
    PatchDecoder,
    evaluate_segmentation,
    large_classes,
    mask_targets,
    positive_weights,
)
from tests.conftest import TINY


def test_decoder_geometry_each_patch_sees_its_3x3_neighbourhood():
    torch.manual_seed(0)
    head = PatchDecoder(3, 2, 2, hidden=8)
    tokens = torch.randn(1, 16, 3)  # a 4 x 4 grid
    out = head(tokens)
    assert out.shape == (1, 2, 8, 8)
    moved = tokens.clone()
    moved[0, 1] += 5.0  # patch (row 0, col 1)
    changed = (head(moved) - out).abs().sum(1)[0] > 0  # (8, 8) output pixels, 2 x 2 per patch
    cells = changed.reshape(4, 2, 4, 2).any(3).any(1)  # which patches' cells changed
    expect = torch.zeros(4, 4, dtype=torch.bool)
    expect[:2, :3] = True  # rows 0-1, cols 0-2: the neighbours of (0, 1)
    assert torch.equal(cells, expect)


def test_positive_weights_follow_the_pixel_share_and_cap():
    t = torch.zeros(4, 3, 8, 8)
    t[:, 0, :4] = 1.0  # half the pixels -> weight 1
    t[0, 1, 0, 0] = 1.0  # 1 / 256 -> capped
    w = positive_weights(t)
    assert w[0] == pytest.approx(1.0) and w[1] == POS_WEIGHT_MAX and w[2] == 1.0  # class 2 has no positive
    assert torch.allclose(positive_weights((t * 255).to(torch.uint8)), w)


def test_large_classes_by_median_area_in_patches():
    t = torch.zeros(3, 2, 8, 8)  # sub 2: a patch is 2 x 2 output pixels
    t[:, 0, :4, :4] = 1.0  # 4 patches everywhere present
    t[0, 1, 0, 0] = 1.0  # a quarter patch
    t[1, 1, :2, :2] = 1.0  # one patch; median of (0.25, 1) = 0.25 (torch's lower median)
    assert large_classes(t, ["big", "small"], 2) == ["big"]


class _Vision:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, images):
        return SimpleNamespace(tokens=self.fn(images))


class _Model(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.vision = _Vision(fn)


def _setup(tiny_dataset, tmp_path):
    cfg = load_config("configs/experiments/demo.yaml", [*TINY, f"data.manifest={tiny_dataset}",
                                                         f"train.output_dir={tmp_path / 'run'}"])
    classes = read_info(tiny_dataset)["classes"]
    tok = train_wordpiece(["the lungs are clear."], 64)
    return cfg, classes, tok, read_manifest(tiny_dataset, ["train"]), read_manifest(tiny_dataset, ["test"])


def test_constant_tokens_score_low_and_mask_tokens_score_high(tiny_dataset, tmp_path):
    cfg, classes, tok, _, test = _setup(tiny_dataset, tmp_path)
    # the tiny train split has 16 masked images, several classes without a positive: pool every
    # non-test split so that the oracle's channels of every class are seen in training
    train = read_manifest(tiny_dataset, ["train", "val", "pretrain", "pretrain-labeled", "pretrain-unpaired"])
    grid = cfg.model.vision.image_size // cfg.model.vision.patch_size
    const = _Model(lambda images: torch.ones(len(images), grid * grid, 8))
    low = evaluate_segmentation(const, tok, train, test, cfg, classes, tiny_dataset, fractions=(1.0,))
    assert low["grid"] == grid and low["n_test"] > 5 and "No Finding" not in low["classes"]

    # oracle: each patch token holds the share of the patch each class covers (read from the files)
    scored, sub = low["classes"], cfg.model.vision.patch_size
    samples = [*train, *test]
    by_id = {s.id: s for s in samples}
    oracle_by_image = {}
    for batch in make_loader(samples, cfg, tok, classes, batch_size=64):
        soft = mask_targets([by_id[i] for i in batch.ids], tiny_dataset, scored, sub * grid)  # (B, K, R, R)
        b, k = soft.shape[:2]
        cells = soft.reshape(b, k, grid, sub, grid, sub).mean(dim=(3, 5)).permute(0, 2, 3, 1).reshape(b, grid * grid, k)
        for img, t in zip(batch.images, cells):
            oracle_by_image[img.numpy().tobytes()] = 4 * t - 2
    oracle = _Model(lambda images: torch.stack([oracle_by_image[x.numpy().tobytes()] for x in images]))
    high = evaluate_segmentation(oracle, tok, train, test, cfg, classes, tiny_dataset, fractions=(0.1, 1.0))
    lo, hi = low["fractions"]["1"]["dice"], high["fractions"]["1"]["dice"]
    # patch-coverage tokens cannot draw sub-patch shapes and the fixed 300-step protocol is short:
    # the oracle reaches ~0.25 here (constant 0.0); issue 6 keeps the protocol's tuning open
    lo_big, hi_big = low["fractions"]["1"]["dice_large"], high["fractions"]["1"]["dice_large"]
    # constant tokens can only learn the zero padding's border prior: 0.0 here; patch-coverage
    # tokens cannot draw sub-patch shapes on a 4 x 4 grid, yet reach ~0.37 (large class ~0.67)
    assert lo < 0.05 and hi > 0.3, (lo, hi)
    assert high["large_classes"] and lo_big < 0.05 and hi_big > 0.5, (lo_big, hi_big)
    assert set(high["fractions"]) == {"0.1", "1"}
    n = high["fractions"]
    assert n["0.1"]["n_train"][0] < n["1"]["n_train"][0] == high["n_train_pool"]


def test_skipped_without_vision_tower_or_masks(tiny_dataset, tmp_path):
    cfg, classes, tok, train, test = _setup(tiny_dataset, tmp_path)
    with pytest.raises(DenseTaskSkipped, match="no vision tower"):
        evaluate_segmentation(torch.nn.Linear(1, 1), tok, train, test, cfg, classes, tiny_dataset)
    from dataclasses import replace
    bare = [replace(s, meta={}) for s in test]
    with pytest.raises(DenseTaskSkipped, match="needs masks"):
        evaluate_segmentation(_Model(lambda x: None), tok, train, bare, cfg, classes, tiny_dataset)


def tiny_clip(tiny_dataset, tmp_path):
    """(cfg, classes, tokenizer, model): an untrained tiny CLIP on the fixture, seeded (also used
    by the detection tests)."""
    from medvlp.hub import build_method

    cfg = load_config("configs/methods/clip.yaml", [*TINY, f"data.manifest={tiny_dataset}",
                                                     f"train.output_dir={tmp_path}"])
    classes = read_info(tiny_dataset)["classes"]
    tok = train_wordpiece(["small right pleural effusion", "no acute findings"] * 4, 300)
    torch.manual_seed(0)
    model = build_method(cfg, tok)
    return cfg, classes, tok, model


def test_tiny_clip_end_to_end(tiny_dataset, tmp_path):
    cfg, classes, tok, model = tiny_clip(tiny_dataset, tmp_path)
    train, test = read_manifest(tiny_dataset, ["train"]), read_manifest(tiny_dataset, ["test"])
    res = evaluate_segmentation(model, tok, train, test, cfg, classes, tiny_dataset, seeds=(0, 1))
    assert set(res["fractions"]) == {"0.01", "0.1", "1"} and res["grid"] == 4 and model.training
    for f in res["fractions"].values():
        assert 0.0 <= f["dice"] <= 1.0 and f["sd"] >= 0.0 and len(f["n_train"]) == 2
        assert all(0.0 <= v <= 1.0 for v in f["per_class"].values())
        assert f["dice_large"] is None or 0.0 <= f["dice_large"] <= 1.0
    assert set(res["large_classes"]) <= set(res["classes"]) and res["protocol"]["steps"] > 0
    assert np.isfinite(res["fractions"]["1"]["dice"])


def test_standardise_uses_training_statistics_and_survives_one_row():
    """Features are scaled by the training rows' mean and std (by hand), also for (B, N, D) patch
    tokens; a single training row (one VQA question, one training image) is centred, not NaN."""
    from medvlp.eval.segmentation import standardise

    train = torch.tensor([[1.0, 10.0], [3.0, 10.0]])
    test = torch.tensor([[2.0, 12.0]])
    tr, te = standardise(train, test)
    sd = math.sqrt(2.0)  # unbiased std of (1, 3); the constant channel's std is floored at 1e-6
    assert torch.allclose(tr[:, 0], torch.tensor([-1 / sd, 1 / sd])) and torch.equal(tr[:, 1], torch.zeros(2))
    assert torch.allclose(te, torch.tensor([[0.0, 2.0 / 1e-6]]))
    tokens = torch.arange(12.0).reshape(2, 3, 2)  # (B, N, D): statistics over every (image, patch) row
    flat = tokens.reshape(-1, 2)
    assert torch.allclose(standardise(tokens)[0], ((flat - flat.mean(0)) / flat.std(0)).reshape(2, 3, 2))
    one, other = standardise(torch.tensor([[4.0, -1.0]]), torch.tensor([[5.0, 1.0]]))
    assert torch.equal(one, torch.zeros(1, 2)) and torch.equal(other, torch.tensor([[1.0, 2.0]]))


def test_a_missing_or_corrupt_mask_names_the_sample_and_file(tmp_path):
    """The dense tasks read one mask PNG per image: a missing or corrupt one is a DataError naming
    the sample and the file, not a PIL traceback."""
    from medvlp.data.sample import Sample
    from medvlp.errors import DataError
    from medvlp.eval.segmentation import mask_targets

    (tmp_path / "bad.png").write_bytes(b"not a png")
    for name, msg in (("bad.png", "cannot be read"), ("gone.png", "cannot be read")):
        s = Sample(id="s7", subject_id="p1", study_id="t1", split="test", meta={"mask": name})
        with pytest.raises(DataError, match=rf"sample s7: mask .*{name}: {msg}.*medvlp synth"):
            mask_targets([s], tmp_path, ["Nodule"], 8)


def test_thresholded_targets_equal_thresholding_the_soft_ones(tiny_dataset):
    """The test truth is thresholded image by image (bool, a quarter of float32's memory) and is
    exactly the soft area fractions thresholded afterwards."""
    from medvlp.data.synth.generator import CLASSES as MASK_CLASSES
    from medvlp.eval.segmentation import mask_targets

    samples = [s for s in read_manifest(tiny_dataset, ["test"]) if s.meta.get("mask")]
    classes = [c for c in MASK_CLASSES if c != "No Finding"]
    soft = mask_targets(samples, tiny_dataset, classes, 24)
    hard = mask_targets(samples, tiny_dataset, classes, 24, at_least=0.5)
    assert hard.dtype == torch.bool and torch.equal(hard, soft >= 0.5) and 0 < int(hard.sum()) < hard.numel()


def test_finetuned_encoder_learns_what_a_frozen_blind_one_cannot(tiny_dataset, tmp_path):
    """encoder="finetune" trains a copy of the vision tower with the decoder: a ViT whose patch
    embedding is zeroed gives the same tokens for every image (frozen Dice 0), and fine-tuning it
    learns to see the findings; the evaluated model itself is left untouched."""
    cfg, classes, tok, model = tiny_clip(tiny_dataset, tmp_path)
    with torch.no_grad():
        for name, p in model.vision.named_parameters():
            if name.startswith("patch_embed"):
                p.zero_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = read_manifest(tiny_dataset, ["train", "val", "pretrain", "pretrain-labeled", "pretrain-unpaired"])
    test = read_manifest(tiny_dataset, ["test"])
    frozen = evaluate_segmentation(model, tok, train, test, cfg, classes, tiny_dataset, fractions=(1.0,))
    tuned = evaluate_segmentation(model, tok, train, test, cfg, classes, tiny_dataset, fractions=(1.0,),
                                  encoder="finetune")
    assert frozen["fractions"]["1"]["dice"] == 0.0 and tuned["fractions"]["1"]["dice"] > 0.03
    assert tuned["protocol"]["encoder"] == "finetune" and frozen["protocol"]["encoder"] == "frozen"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="'frozen' or 'finetune'"):
        evaluate_segmentation(model, tok, train, test, cfg, classes, tiny_dataset, encoder="tuned")


def test_finetuned_tokens_use_layer_decayed_rates_and_fixed_statistics():
    """The fine-tuned encoder's groups follow the finetune task's layer-wise decay (stem lowest,
    top highest), warm up then decay, and its tokens are standardised by the given statistics."""
    from medvlp.config import VisionConfig
    from medvlp.eval.finetune import LAYER_DECAY
    from medvlp.eval.segmentation import ENCODER_LR, FinetunedTokens
    from medvlp.models.vit import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(VisionConfig(image_size=16, patch_size=8, width=16, depth=2, heads=2))
    mean, std = torch.full((16,), 0.5), torch.full((16,), 2.0)
    tuned = FinetunedTokens(vit, mean, std)
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(tuned(x), (vit(x).tokens - 0.5) / 2.0, atol=1e-6)
    groups = tuned.param_groups()
    lrs = {g["lr"] for g in groups}
    assert max(lrs) == pytest.approx(ENCODER_LR) and min(lrs) == pytest.approx(ENCODER_LR * LAYER_DECAY ** 3)
    assert sum(len(g["params"]) for g in groups) == len(list(vit.parameters()))
    opt = torch.optim.AdamW(groups)
    tuned.schedule(opt, 0, 100)
    first = [g["lr"] for g in opt.param_groups]
    tuned.schedule(opt, 10, 100)
    assert all(a < b for a, b in zip(first, [g["lr"] for g in opt.param_groups]))  # warming up
    assert not any(p is q for p in tuned.parameters() for q in vit.parameters())  # a copy
