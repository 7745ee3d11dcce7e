"""Fusion encoder: both streams fused, padding ignored, memory slots used and trained."""
from __future__ import annotations

import pytest
import torch

from medvlp.models.fusion import FusionEncoder


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(2, 5, 16, generator=g), torch.randn(2, 6, 16, generator=g)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    return img, txt, pad


def test_shapes_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    fusion = FusionEncoder(16, depth=2, heads=2, memory_slots=3)
    img, txt, pad = _inputs()
    fi, ft = fusion(img, txt, pad)
    assert fi.shape == img.shape and ft.shape == txt.shape
    (fi.sum() + ft[~pad].sum()).backward()
    missing = [n for n, p in fusion.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_padding_tokens_do_not_reach_real_outputs():
    torch.manual_seed(0)
    fusion = FusionEncoder(16, depth=2, heads=2).eval()
    img, txt, pad = _inputs()
    fi, ft = fusion(img, txt, pad)
    txt2 = txt.clone()
    txt2[pad] = 50.0 * torch.randn(int(pad.sum()), 16)
    fi2, ft2 = fusion(img, txt2, pad)
    torch.testing.assert_close(fi, fi2)
    torch.testing.assert_close(ft[~pad], ft2[~pad])
    # without the mask they would change
    fi3, _ = fusion(img, txt2, None)
    assert (fi3[1] - fi[1]).abs().max() > 1e-3


def test_cross_attention_fuses_and_memory_changes_the_text_stream():
    torch.manual_seed(0)
    fusion = FusionEncoder(16, depth=1, heads=2, memory_slots=4).eval()
    img, txt, pad = _inputs()
    _, ft = fusion(img, txt, pad)
    _, ft_other_image = fusion(img.flip(0), txt, pad)
    assert (ft - ft_other_image).abs().max() > 1e-3  # the report stream sees the image
    with torch.no_grad():
        fusion.memory.add_(1.0)
    _, ft_mem = fusion(img, txt, pad)
    assert (ft_mem - ft).abs().max() > 1e-3
    with pytest.raises(ValueError, match="divisible"):
        FusionEncoder(10, heads=3)
