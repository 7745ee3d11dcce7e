"""Token-patch local alignment (GLoRIA across pairs, MGCA within pairs) against loop references."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medvlp.losses.local import gloria_local_loss, gloria_pair_scores, mgca_local_loss


def _data(seed=0, b=3, l=5, n=4, d=8):
    g = torch.Generator().manual_seed(seed)
    words, patches = torch.randn(b, l, d, generator=g), torch.randn(b, n, d, generator=g)
    mask = torch.ones(b, l, dtype=torch.bool)
    mask[0, 3:] = False  # padding in the first report
    mask[2, 4] = False
    return words, mask, patches


def test_gloria_pair_scores_match_a_loop():
    words, mask, patches = _data()
    got = gloria_pair_scores(words, mask, patches, sharpen=4.0, agg=5.0)
    for i in range(3):
        p = F.normalize(patches[i], dim=-1)
        for k in range(3):
            scores = []
            for j in range(5):
                if not mask[k, j]:
                    continue
                w = F.normalize(words[k, j], dim=-1)
                a = torch.softmax(4.0 * (p @ w), dim=0)
                c = F.normalize((a[:, None] * p).sum(0), dim=-1)
                scores.append(float(c @ w))
            expected = math.log(sum(math.exp(5.0 * s) for s in scores)) / 5.0
            assert got[i, k].item() == pytest.approx(expected, abs=1e-5)


def test_gloria_loss_is_infonce_over_pair_scores_and_prefers_aligned_pairs():
    words, mask, patches = _data()
    s = 10.0 * gloria_pair_scores(words, mask, patches)
    t = torch.arange(3)
    expected = 0.5 * (F.cross_entropy(s, t) + F.cross_entropy(s.t(), t))
    assert gloria_local_loss(words, mask, patches).item() == pytest.approx(expected.item(), abs=1e-6)
    aligned = patches[:, [0, 1, 2, 3, 0]] + 0.05 * torch.randn(3, 5, 8)  # each report's words = its patches
    full = torch.ones(3, 5, dtype=torch.bool)
    assert gloria_local_loss(aligned, full, patches) < gloria_local_loss(aligned[[1, 2, 0]], full, patches)


def _mgca_direction_loop(q, qm, k, km, imp, tau):
    total = 0.0
    for b in range(q.shape[0]):
        qs, ks = F.normalize(q[b][qm[b]], dim=-1), F.normalize(k[b][km[b]], dim=-1)
        a = torch.softmax(qs @ ks.t() / math.sqrt(q.shape[-1]), dim=-1)
        ctx = F.normalize(a @ ks, dim=-1)
        logits = qs @ ctx.t() / tau
        log_p = torch.diagonal(logits) - torch.logsumexp(logits, dim=1)
        w = imp[b][qm[b]].float()
        total += float(-(w / w.sum() * log_p).sum())
    return total / q.shape[0]


def test_mgca_matches_a_loop_with_importance_and_padding():
    words, mask, patches = _data(1)
    g = torch.Generator().manual_seed(5)
    wi, pi = torch.rand(3, 5, generator=g), torch.rand(3, 4, generator=g)
    got = mgca_local_loss(words, mask, patches, word_importance=wi, patch_importance=pi, tau=0.1)
    full = torch.ones(3, 4, dtype=torch.bool)
    expected = 0.5 * (_mgca_direction_loop(words, mask, patches, full, wi, 0.1)
                      + _mgca_direction_loop(patches, full, words, mask, pi, 0.1))
    assert got.item() == pytest.approx(expected, abs=1e-5)
    # padding positions do not matter, whatever they hold
    words2 = words.clone()
    words2[~mask] = 100.0 * torch.randn(int((~mask).sum()), 8)
    assert mgca_local_loss(words2, mask, patches, word_importance=wi, patch_importance=pi).item() == pytest.approx(
        got.item(), abs=1e-5)


def test_mgca_uniform_importance_default_and_gradients():
    words, mask, patches = _data(2)
    words.requires_grad_(True)
    loss = mgca_local_loss(words, mask, patches)
    ones = mgca_local_loss(words, mask, patches, word_importance=torch.ones(3, 5), patch_importance=torch.ones(3, 4))
    assert loss.item() == pytest.approx(ones.item())
    loss.backward()
    assert words.grad[mask].abs().sum() > 0 and words.grad[~mask].abs().sum() == 0
