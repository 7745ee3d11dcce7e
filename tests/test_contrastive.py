"""Tests of the CLIP / ConVIRT symmetric InfoNCE (single process)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medvlp.losses import ClipLoss, contrastive_cross_entropy, info_nce, same_key_mask


def _hand_info_nce(images, texts, scale, labels=None, dropped=frozenset()):
    """Symmetric InfoNCE from plain Python lists, with math.exp / math.log only.

    ``labels[i]`` is the column paired with row i (None: unpaired); ``dropped`` is a set
    of (row, column) pairs removed from the negatives.
    """
    rows, cols = len(images), len(texts)
    labels = list(range(rows)) if labels is None else labels
    s = [[scale * sum(a * b for a, b in zip(images[i], texts[k])) for k in range(cols)] for i in range(rows)]

    def ce(scores, target, keep):
        return -(scores[target] - math.log(sum(math.exp(scores[j]) for j in keep)))

    row_terms = [
        ce(s[i], labels[i], [k for k in range(cols) if k == labels[i] or (i, k) not in dropped])
        for i in range(rows)
        if labels[i] is not None
    ]
    col_terms = []
    for i, k in enumerate(labels):
        if k is None:
            continue
        column = [s[r][k] for r in range(rows)]
        col_terms.append(ce(column, i, [r for r in range(rows) if r == i or (r, k) not in dropped]))
    return 0.5 * (sum(row_terms) / len(row_terms) + sum(col_terms) / len(col_terms))


def _t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_info_nce_two_by_two_by_hand():
    images, texts, scale = [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.6, 0.8]], 2.0
    # s = [[2.0, 1.2], [0.0, 1.6]]
    rows = [-math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(1.2))), -math.log(math.exp(1.6) / (1 + math.exp(1.6)))]
    cols = [-math.log(math.exp(2.0) / (math.exp(2.0) + 1)), -math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))]
    expected = 0.5 * (sum(rows) / 2 + sum(cols) / 2)
    assert expected == pytest.approx(_hand_info_nce(images, texts, scale), abs=1e-12)
    loss = info_nce(_t(images), _t(texts), torch.tensor(scale))
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_random_batch_matches_cross_entropy_reference():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    logits = 7.0 * img @ txt.t()
    target = torch.arange(6)
    reference = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    torch.testing.assert_close(info_nce(img, txt, 7.0), reference)
    expected = _hand_info_nce(img.tolist(), txt.tolist(), 7.0)
    assert info_nce(img, txt, 7.0).item() == pytest.approx(expected, abs=1e-5)


def test_perfect_alignment_with_large_scale_is_near_zero():
    feats = torch.eye(4)
    assert info_nce(feats, feats, 100.0).item() < 1e-6
    # the same features with a shuffled pairing are far from zero
    assert info_nce(feats, feats.roll(1, dims=0), 100.0).item() > 50


def test_mask_of_identical_texts_removes_exactly_those_negatives():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(4, 3, generator=g), dim=-1)
    txt = F.normalize(torch.randn(4, 3, generator=g), dim=-1)
    keys = torch.tensor([7, 3, 7, 5])  # reports 0 and 2 are identical
    mask = same_key_mask(keys)
    assert mask.tolist() == [
        [True, False, True, False],
        [False, True, False, False],
        [True, False, True, False],
        [False, False, False, True],
    ]
    masked = info_nce(img, txt, 5.0, negative_mask=mask)
    expected = _hand_info_nce(img.tolist(), txt.tolist(), 5.0, dropped={(0, 2), (2, 0)})
    assert masked.item() == pytest.approx(expected, abs=1e-5)
    unmasked = _hand_info_nce(img.tolist(), txt.tolist(), 5.0)
    assert abs(masked.item() - unmasked) > 1e-3
    # the gradient stays finite although masked logits are -inf
    img.requires_grad_(True)
    info_nce(img, txt, 5.0, negative_mask=mask).backward()
    assert torch.isfinite(img.grad).all()


def test_mask_never_removes_the_target():
    g = torch.Generator().manual_seed(2)
    img = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    txt = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    diagonal_only = torch.eye(3, dtype=torch.bool)
    torch.testing.assert_close(info_nce(img, txt, 5.0, negative_mask=diagonal_only), info_nce(img, txt, 5.0))
    # every negative removed: each softmax holds only its target
    everything = torch.ones(3, 3, dtype=torch.bool)
    assert info_nce(img, txt, 5.0, negative_mask=everything).item() == pytest.approx(0.0, abs=1e-7)


def test_bf16_inputs_give_finite_fp32_loss():
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(8, 16, generator=g), dim=-1).bfloat16()
    txt = F.normalize(torch.randn(8, 16, generator=g), dim=-1).bfloat16()
    scale = torch.tensor(100.0)
    loss = info_nce(img, txt, scale)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    reference = info_nce(img.float(), txt.float(), scale)
    torch.testing.assert_close(loss, reference)
    # autocast must not push the logits back to bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = info_nce(img.float(), txt.float(), scale)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, reference)


def test_rectangular_extra_texts_and_unpaired_images_by_hand():
    g = torch.Generator().manual_seed(4)
    img = F.normalize(torch.randn(2, 3, generator=g), dim=-1)
    txt = F.normalize(torch.randn(3, 3, generator=g), dim=-1)
    # text 1 is paired with no image: a negative for the image->text term only
    loss = info_nce(img, txt, 4.0, labels=torch.tensor([0, 2]))
    assert loss.item() == pytest.approx(_hand_info_nce(img.tolist(), txt.tolist(), 4.0, labels=[0, 2]), abs=1e-5)
    # image 1 has no text: a negative for the text->image term only
    loss = info_nce(txt, img, 4.0, labels=torch.tensor([1, -1, 0]))
    expected = _hand_info_nce(txt.tolist(), img.tolist(), 4.0, labels=[1, None, 0])
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_no_paired_sample_gives_zero_loss_and_zero_grad():
    img = F.normalize(torch.randn(3, 4), dim=-1).requires_grad_(True)
    txt = F.normalize(torch.randn(2, 4), dim=-1)
    loss = info_nce(img, txt, 10.0, labels=torch.full((3,), -1))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(img.grad, torch.zeros_like(img))


def test_one_direction_matches_hand_row_terms():
    images, texts = [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]]
    loss = contrastive_cross_entropy(_t(images), _t(texts), 3.0, torch.tensor([2, 1]))
    s = [[3.0, 1.8, 0.0], [0.0, 2.4, -3.0]]
    rows = [-(s[0][2] - math.log(sum(math.exp(v) for v in s[0]))), -(s[1][1] - math.log(sum(math.exp(v) for v in s[1])))]
    assert loss.item() == pytest.approx(sum(rows) / 2, abs=1e-6)


def test_bad_shapes_raise_clear_errors():
    a, b = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="needs `labels`"):
        info_nce(a, b, 1.0)
    with pytest.raises(ValueError, match="negative_mask"):
        info_nce(a, a, 1.0, negative_mask=torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="paired"):
        ClipLoss()(a, b, 1.0)
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        ClipLoss()(a, a, 1.0, negative_mask=torch.zeros(3, 3, dtype=torch.bool))


@pytest.mark.parametrize("local_loss", [False, True])
def test_clip_loss_single_process_equals_info_nce(local_loss):
    g = torch.Generator().manual_seed(5)
    img = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    scale = torch.tensor(20.0)
    loss_fn = ClipLoss(local_loss=local_loss)
    torch.testing.assert_close(loss_fn(img, txt, scale), info_nce(img, txt, scale))
    keys = torch.tensor([0, 1, 0, 2, 1])
    expected = info_nce(img, txt, scale, negative_mask=same_key_mask(keys))
    torch.testing.assert_close(loss_fn(img, txt, scale, pair_keys=keys), expected)
    torch.testing.assert_close(loss_fn(img, txt, scale, same_key_mask(keys)), expected)


def test_logit_scale_receives_gradient():
    img = F.normalize(torch.randn(4, 6), dim=-1)
    txt = F.normalize(torch.randn(4, 6), dim=-1)
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    ClipLoss()(img, txt, log_scale.exp()).backward()
    assert log_scale.grad is not None and torch.isfinite(log_scale.grad) and log_scale.grad != 0
