"""Sinkhorn codes: row and column sums match their targets; swapped prediction by hand."""
from __future__ import annotations

import math

import pytest
import torch

from medvlp.losses.prototypes import sinkhorn, swapped_prediction_loss


def test_row_and_column_sums_match_equal_shares():
    scores = torch.randn(12, 4, generator=torch.Generator().manual_seed(0)).requires_grad_()
    q = sinkhorn(scores, eps=0.05, iters=200)
    assert torch.allclose(q.sum(1), torch.ones(12), atol=1e-5)
    assert torch.allclose(q.sum(0), torch.full((4,), 3.0), atol=1e-3)
    # the codes are targets: no gradient flows back into the scores through them
    assert not q.requires_grad and q.grad_fn is None


def test_class_frequency_shares_and_allowed_assignments():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(10, 3, generator=g, dtype=torch.bfloat16)  # fp32 inside even under bf16
    allowed = torch.ones(10, 3, dtype=torch.bool)
    allowed[:4, 2] = False  # four samples may not take prototype 2
    shares = torch.tensor([0.5, 0.3, 0.2])
    q = sinkhorn(scores, eps=0.1, iters=500, shares=shares, allowed=allowed)
    assert q.dtype == torch.float32 and (q[:4, 2] == 0).all()
    assert torch.allclose(q.sum(1), torch.ones(10), atol=1e-5)
    assert torch.allclose(q.sum(0), 10 * shares, atol=1e-3)


def test_small_eps_stays_finite():
    scores = torch.randn(8, 8, generator=torch.Generator().manual_seed(2)) * 3
    assert not torch.isfinite(torch.exp(scores / 1e-3)).all()  # a plain exp would overflow here
    q = sinkhorn(scores, eps=1e-3, iters=20)
    assert torch.isfinite(q).all() and torch.allclose(q.sum(1), torch.ones(8), atol=1e-5)


def test_swapped_prediction_hand_computed():
    img_logits = torch.tensor([[0.0, math.log(3.0) * 0.2]])  # softmax(l / 0.2) = [1/4, 3/4]
    txt_logits = torch.zeros(1, 2)  # [1/2, 1/2]
    img_codes, txt_codes = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    expected = -0.5 * (math.log(0.75) + math.log(0.5))
    got = swapped_prediction_loss(img_logits, txt_logits, img_codes, txt_codes, temperature=0.2)
    assert got.item() == pytest.approx(expected, rel=1e-5)
