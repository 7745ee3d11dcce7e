"""Label-derived contrastive targets (UniCL, MedCLIP) against hand-computed cases."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medvlp.data.sample import MISSING, NEGATIVE, POSITIVE
from medvlp.losses.contrastive import info_nce
from medvlp.losses.soft_contrastive import label_contrastive_loss, label_targets

P, N, M = POSITIVE, NEGATIVE, MISSING


def _features(r, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(r, 8, generator=g), dim=1), F.normalize(torch.randn(c, 8, generator=g), dim=1)


@pytest.mark.parametrize("mode", ["equal", "soft"])
def test_reduces_to_clip_when_all_labels_differ(mode):
    img, txt = _features(4, 4)
    codes = torch.tensor([[P, N, N], [N, P, N], [N, N, P], [P, P, N]])
    got = label_contrastive_loss(img, txt, 10.0, codes, codes, torch.arange(4), mode=mode, tau_t=0.01)
    # soft mode: off-diagonal cos <= 0.71, so with tau_t 0.01 the target is one-hot to 1e-12
    assert got.item() == pytest.approx(info_nce(img, txt, 10.0).item(), abs=1e-6)


def test_equal_labels_are_multi_positives_by_hand():
    codes = torch.tensor([[P, N], [P, N], [N, P]])
    t, valid = label_targets(codes, codes, torch.arange(3), mode="equal")
    assert valid.all()
    assert torch.allclose(t, torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))
    img, txt = _features(3, 3, seed=1)
    logits = 5.0 * img @ txt.t()
    lp_i, lp_t = torch.log_softmax(logits, 1), torch.log_softmax(logits.t(), 1)
    expected_i = -(0.5 * (lp_i[0, 0] + lp_i[0, 1]) + 0.5 * (lp_i[1, 0] + lp_i[1, 1]) + lp_i[2, 2]) / 3
    expected_t = -(0.5 * (lp_t[0, 0] + lp_t[0, 1]) + 0.5 * (lp_t[1, 0] + lp_t[1, 1]) + lp_t[2, 2]) / 3
    got = label_contrastive_loss(img, txt, 5.0, codes, codes, torch.arange(3), mode="equal")
    assert got.item() == pytest.approx(0.5 * (expected_i + expected_t).item(), abs=1e-6)


def test_more_texts_than_images_by_hand():
    """A rectangular batch: text 2 has no image (a labelled report alone) and still trains, as a
    positive of the image with its labels and as a text->image query."""
    img_codes = torch.tensor([[P, N], [N, P]])
    txt_codes = torch.tensor([[P, N], [N, P], [P, N]])
    pair = torch.tensor([0, 1])
    img, txt = _features(2, 3, seed=3)
    logits = 4.0 * img @ txt.t()  # (2, 3)
    lp_i, lp_t = torch.log_softmax(logits, 1), torch.log_softmax(logits.t(), 1)
    expected_i = -(0.5 * (lp_i[0, 0] + lp_i[0, 2]) + lp_i[1, 1]) / 2
    expected_t = -(lp_t[0, 0] + lp_t[1, 1] + lp_t[2, 0]) / 3
    got = label_contrastive_loss(img, txt, 4.0, img_codes, txt_codes, pair, mode="equal")
    assert got.item() == pytest.approx(0.5 * (expected_i + expected_t).item(), abs=1e-6)


def test_soft_targets_are_the_softmax_of_label_cosines():
    codes = torch.tensor([[P, P], [P, N]])
    t, _ = label_targets(codes, codes, torch.arange(2), mode="soft", tau_t=0.1)
    cos = 1 / math.sqrt(2)
    row0 = torch.softmax(torch.tensor([1.0, cos]) / 0.1, 0)
    row1 = torch.softmax(torch.tensor([cos, 1.0]) / 0.1, 0)
    assert torch.allclose(t, torch.stack([row0, row1]), atol=1e-6)


def test_unlabelled_rows_fall_back_to_their_pair_and_unpaired_unlabelled_rows_are_dropped():
    img_codes = torch.tensor([[P, N], [M, M], [M, M], [P, N]])
    txt_codes = torch.tensor([[P, N], [M, M], [P, N]])  # 3 texts: image 2 has no report
    pair = torch.tensor([0, 1, -1, 2])
    t, valid = label_targets(img_codes, txt_codes, pair, mode="equal")
    assert valid.tolist() == [True, True, False, True]
    assert torch.allclose(t[1], torch.tensor([0.0, 1.0, 0.0]))  # one-hot to its own report
    assert torch.allclose(t[0], torch.tensor([0.5, 0.0, 0.5]))  # same labels as text 2
    img, txt = _features(4, 3, seed=2)
    loss = label_contrastive_loss(img, txt, 10.0, img_codes, txt_codes, pair, mode="soft")
    assert torch.isfinite(loss)


def test_identical_texts_leave_the_denominator():
    img, txt = _features(3, 3, seed=3)
    codes = torch.full((3, 2), M)  # no labels: one-hot pairs, as CLIP
    same = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])  # reports 0 and 1 identical
    got = label_contrastive_loss(img, txt, 10.0, codes, codes, torch.arange(3), same=same)
    s = 10.0 * img @ txt.t()
    keep = [[0, 2], [1, 2], [0, 1, 2]]  # each row's denominator without the identical report
    i2t = sum(-(s[i, i] - torch.logsumexp(s[i, keep[i]], 0)) for i in range(3)) / 3
    t2i = sum(-(s[i, i] - torch.logsumexp(s[keep[i], i], 0)) for i in range(3)) / 3
    assert got.item() == pytest.approx(0.5 * (i2t + t2i).item(), abs=1e-6)
    assert got.item() < label_contrastive_loss(img, txt, 10.0, codes, codes, torch.arange(3)).item()
