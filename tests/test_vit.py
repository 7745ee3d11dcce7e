"""Tests of the ViT image encoder: shapes, MAE masking, patchify, attention, checkpointing."""
from __future__ import annotations

import pytest
import torch

from medvlp.config import VisionConfig
from medvlp.errors import ConfigError
from medvlp.models.vit import VisionTransformer, random_masking
from medvlp.registry import ENCODERS


def tiny_vit(**overrides) -> VisionTransformer:
    cfg = dict(image_size=32, patch_size=8, in_chans=1, width=32, depth=2, heads=2)
    cfg.update(overrides)
    torch.manual_seed(0)
    return VisionTransformer(VisionConfig(**cfg))


def test_registered():
    assert ENCODERS.get("vit") is VisionTransformer


@pytest.mark.parametrize("in_chans", [1, 3])
def test_output_shapes(in_chans):
    model = tiny_vit(in_chans=in_chans).eval()
    out = model(torch.randn(2, in_chans, 32, 32))
    assert out.pooled.shape == (2, 32)
    assert out.tokens.shape == (2, 16, 32)
    assert out.mask is None and out.ids_keep is None and out.cls_attention is None


def test_grid_64px_patch8():
    model = tiny_vit(image_size=64, patch_size=8)
    assert (model.grid_size, model.num_patches, model.patch_size, model.width) == (8, 64, 8, 32)
    assert model(torch.randn(1, 1, 64, 64)).tokens.shape == (1, 64, 32)


def test_wrong_image_size_is_explained():
    with pytest.raises(ValueError, match="image_size"):
        tiny_vit()(torch.randn(1, 1, 48, 48))
    with pytest.raises(ConfigError, match="model.vision.width"):
        tiny_vit(width=30, heads=3)


def test_masking_counts_and_mask():
    model = tiny_vit().eval()
    out = model(torch.randn(3, 1, 32, 32), mask_ratio=0.75)
    keep = round(16 * 0.25)
    assert out.tokens.shape == (3, keep, 32)
    assert out.ids_keep.shape == (3, keep) and out.ids_restore.shape == (3, 16)
    assert out.mask.shape == (3, 16)
    assert torch.equal(out.mask.sum(dim=1), torch.full((3,), 16.0 - keep))
    # the mask is 0 exactly at the kept patches (original patch order)
    visible = torch.ones(3, 16).scatter(1, out.ids_keep, 0.0)
    assert torch.equal(out.mask, visible)


def test_ids_restore_inverts_shuffle():
    torch.manual_seed(1)
    x = torch.randn(2, 16, 5)
    visible, mask, ids_keep, ids_restore = random_masking(x, 0.5)
    mask_tokens = torch.zeros(2, 16 - visible.shape[1], 5)
    shuffled = torch.cat([visible, mask_tokens], dim=1)
    restored = shuffled.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, 5))
    # visible patches are back in their place, masked places hold the mask token
    assert torch.equal(restored[mask == 0], x[mask == 0])
    assert torch.equal(restored[mask == 1], torch.zeros(int(mask.sum()), 5))


def test_same_noise_same_mask():
    model = tiny_vit().eval()
    images = torch.randn(2, 1, 32, 32)
    noise = torch.rand(2, 16)
    a = model(images, mask_ratio=0.5, noise=noise)
    b = model(images, mask_ratio=0.5, noise=noise)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.ids_keep, b.ids_keep)
    assert torch.equal(a.ids_keep, noise.argsort(dim=1)[:, :8])
    c = model(images, mask_ratio=0.5, noise=torch.rand(2, 16))
    assert not torch.equal(a.mask, c.mask)


def test_masked_tokens_match_position_aware_selection():
    """Position embeddings are added before masking: without blocks (tokens = LN(patch
    embedding + position)), masked tokens are exactly the kept rows of the full output."""
    model = tiny_vit(depth=0).eval()  # no blocks: tokens = LN(patch_embed + pos)
    images = torch.randn(2, 1, 32, 32)
    full = model(images)
    masked = model(images, mask_ratio=0.5, noise=torch.rand(2, 16))
    expected = full.tokens.gather(1, masked.ids_keep.unsqueeze(-1).expand(-1, -1, 32))
    torch.testing.assert_close(masked.tokens, expected)


def test_patchify_roundtrip():
    model = tiny_vit(in_chans=3)
    images = torch.randn(2, 3, 32, 32)
    patches = model.patchify(images)
    assert patches.shape == (2, 16, 8 * 8 * 3)
    assert torch.equal(model.unpatchify(patches), images)
    # patch 1 is the second patch of the first row, flattened as (p, p, C)
    assert torch.equal(patches[0, 1], images[0, :, :8, 8:16].permute(1, 2, 0).reshape(-1))


def test_cls_attention():
    model = tiny_vit().eval()
    images = torch.randn(2, 1, 32, 32)
    out = model(images, return_attention=True)
    # (B, heads, patches): [CLS] self-weight removed, renormalised over the patch tokens
    assert out.cls_attention.shape == (2, 2, 16)
    assert (out.cls_attention >= 0).all()
    torch.testing.assert_close(out.cls_attention.sum(-1), torch.ones(2, 2))
    # the explicit-softmax path computes the same thing as the SDPA path
    torch.testing.assert_close(out.pooled, model(images).pooled, atol=1e-5, rtol=1e-5)
    masked = model(images, mask_ratio=0.5, return_attention=True)
    assert masked.cls_attention.shape == (2, 2, 8)


def test_grad_checkpointing_matches():
    images = torch.randn(2, 1, 32, 32)
    noise = torch.rand(2, 16)
    grads = []
    losses = []
    for enable in (False, True):
        model = tiny_vit(drop_path=0.0).train()
        model.set_grad_checkpointing(enable)
        calls = []
        model.blocks[0].attn.register_forward_pre_hook(lambda *args: calls.append(1))
        out = model(images, mask_ratio=0.25, noise=noise, return_attention=True)
        loss = out.pooled.square().sum() + out.tokens.square().mean() + out.cls_attention.square().sum()
        loss.backward()
        assert len(calls) == (2 if enable else 1)  # a checkpointed block runs again in backward
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_every_parameter_gets_gradient():
    model = tiny_vit().train()
    out = model(torch.randn(2, 1, 32, 32))
    # a random projection: a plain sum after LayerNorm has zero gradient by construction
    (out.pooled * torch.randn_like(out.pooled)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_eval_determinism_and_drop_path():
    model = tiny_vit(drop_path=0.5)
    images = torch.randn(2, 1, 32, 32)
    model.eval()
    torch.testing.assert_close(model(images).pooled, model(images).pooled, rtol=0, atol=0)
    model.train()
    torch.manual_seed(0)
    a = model(images).pooled
    torch.manual_seed(1)
    b = model(images).pooled
    assert not torch.allclose(a, b)  # stochastic depth is active while training


def test_initialisation():
    model = tiny_vit(width=64)
    # MAE: Xavier-uniform linears, std = sqrt(2 / (fan_in + fan_out))
    qkv = model.blocks[0].attn.qkv.weight
    assert qkv.std().item() == pytest.approx((2 / (qkv.shape[0] + qkv.shape[1])) ** 0.5, rel=0.1)
    pe = model.patch_embed.weight.flatten(1)  # the patch embedding is initialised as a linear
    assert pe.std().item() == pytest.approx((2 / (pe.shape[0] + pe.shape[1])) ** 0.5, rel=0.1)
    assert torch.equal(model.blocks[0].attn.qkv.bias, torch.zeros_like(model.blocks[0].attn.qkv.bias))
    assert torch.equal(model.norm.weight, torch.ones(64))
    assert "pos_embed" not in model.state_dict()  # fixed sin-cos, rebuilt from the config
