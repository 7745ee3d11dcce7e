"""ITM hard-negative sampling: never a positive or an identical report, proportional to exp(sim)."""
from __future__ import annotations

import torch

from medvlp.losses.matching import not_negative_mask, sample_hard_negatives


def test_never_samples_the_pair_or_identical_reports():
    torch.manual_seed(0)
    sim = torch.randn(6, 6)
    keys = torch.tensor([0, 1, 1, 2, 3, 3])  # reports 1 & 2 identical, 4 & 5 identical
    same = not_negative_mask(6, keys)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        t_for_i, i_for_t = sample_hard_negatives(sim, same, generator=g)
        assert not same[torch.arange(6), t_for_i].any()
        assert not same[i_for_t, torch.arange(6)].any()


def test_frequencies_follow_the_softmax_of_similarities():
    sim = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [3.0, 0.0, 0.0]])
    same = not_negative_mask(3)
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(3, 3)
    n = 4000
    for _ in range(n):
        t_for_i, _ = sample_hard_negatives(sim, same, generator=g)
        counts[torch.arange(3), t_for_i] += 1
    # row 0: columns 1 and 2 with weights e^2 : e^0
    p = torch.exp(torch.tensor(2.0)) / (torch.exp(torch.tensor(2.0)) + 1)
    assert abs(counts[0, 1] / n - p) < 0.03 and counts[0, 0] == 0


def test_rows_without_a_negative_are_flagged():
    keys = torch.tensor([5, 5, 5])  # the same report three times: no negatives anywhere
    t_for_i, i_for_t = sample_hard_negatives(torch.zeros(3, 3), not_negative_mask(3, keys))
    assert (t_for_i == -1).all() and (i_for_t == -1).all()
    t_for_i, _ = sample_hard_negatives(torch.zeros(3, 3), not_negative_mask(3, torch.tensor([5, 5, 7])))
    assert t_for_i.tolist()[:2] == [2, 2] and t_for_i[2] in (0, 1)
