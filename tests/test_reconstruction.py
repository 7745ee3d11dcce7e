"""Masked image modeling loss against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from medvlp.config import VisionConfig
from medvlp.losses.reconstruction import masked_patch_mse, normalize_patches
from medvlp.models.vit import VisionTransformer


def test_masked_patch_mse_hand_computed_without_normalisation():
    patches = torch.tensor([[[1.0, 3.0], [0.0, 0.0], [2.0, 2.0]]])  # (1, 3, 2)
    pred = torch.tensor([[[0.0, 3.0], [5.0, 5.0], [2.0, 0.0]]])
    mask = torch.tensor([[1, 0, 1]])
    # masked patches 0 and 2: per-patch MSE (1 + 0)/2 = 0.5 and (0 + 4)/2 = 2 -> mean 1.25; patch 1 ignored
    assert masked_patch_mse(pred, patches, mask, norm_pix=False).item() == pytest.approx(1.25)


def test_norm_pix_standardises_each_target_patch():
    patches = torch.tensor([[[1.0, 3.0], [2.0, 2.0]]])
    norm = normalize_patches(patches)
    assert torch.allclose(norm[0, 0], torch.tensor([-1.0, 1.0]), atol=1e-5)  # mean 2, sd 1
    assert torch.allclose(norm[0, 1], torch.zeros(2))  # a flat patch becomes zeros (eps)
    pred = torch.zeros_like(patches)
    mask = torch.tensor([[1, 1]])
    assert masked_patch_mse(pred, patches, mask).item() == pytest.approx(0.5, rel=1e-4)  # (1 + 0) / 2


def test_loss_only_on_masked_patches_and_zero_when_nothing_masked():
    torch.manual_seed(0)
    patches, pred = torch.randn(2, 4, 3), torch.randn(2, 4, 3, requires_grad=True)
    mask = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0]])
    masked_patch_mse(pred, patches, mask).backward()
    assert (pred.grad[mask == 0] == 0).all() and (pred.grad[mask == 1] != 0).any()
    none = masked_patch_mse(pred, patches, torch.zeros(2, 4))
    assert none.item() == 0.0 and none.requires_grad


def test_with_the_vit_masking_and_patchify():
    torch.manual_seed(0)
    vit = VisionTransformer(VisionConfig(image_size=32, patch_size=8, in_chans=1, width=32, depth=1, heads=2))
    images = torch.randn(2, 1, 32, 32)
    out = vit(images, mask_ratio=0.75)
    patches = vit.patchify(images)
    assert out.mask.shape == patches.shape[:2] and int(out.mask.sum()) == 2 * 12
    loss = masked_patch_mse(torch.zeros_like(patches), patches, out.mask)
    assert math.isclose(loss.item(), 1.0, rel_tol=1e-3)  # predicting the mean of standardised patches
    with pytest.raises(ValueError, match="expected"):
        masked_patch_mse(torch.zeros(2, 16, 3), patches, out.mask)
