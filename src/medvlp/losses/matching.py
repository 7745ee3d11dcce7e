"""Image-text matching (ITM): in-batch hard negatives sampled from the similarity matrix.

For each image a negative report is drawn with probability proportional to
``softmax(sim[i, :])`` over the reports that are true negatives, and for each report a negative
image likewise over its column (ALBEF's scheme): similar-looking pairs are chosen more often,
which is what makes the matching task hard. Pairs that are not negatives get zero weight: the
pair itself (the diagonal) and, through ``same``, pairs whose reports are identical (a normal
report describes many images) or whose label vectors are identical where a method says so.
Rows with no valid negative get index -1 and are to be left out of the ITM loss.
"""
from __future__ import annotations

import torch


def not_negative_mask(n: int, pair_keys: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """(n, n) bool: True where column k is not a negative of row i (i == k, or equal keys)."""
    eye = torch.eye(n, dtype=torch.bool, device=device)
    if pair_keys is None:
        return eye
    return eye | (pair_keys[:, None] == pair_keys[None, :])


@torch.no_grad()
def sample_hard_negatives(sim: torch.Tensor, same: torch.Tensor, *, temperature: float = 1.0,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard negatives from a (B, B) image x text similarity matrix.

    Args:
        sim: (B, B) similarities, row i = image i, column k = report k.
        same: (B, B) bool, True where (i, k) must not be used as a negative.
        temperature: the softmax temperature (sim / temperature).
    Returns ``(text_for_image, image_for_text)``: (B,) long indices, -1 where a row (or
    column) has no valid negative. No gradient flows through the sampling.
    """
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or same.shape != sim.shape:
        raise ValueError(f"sample_hard_negatives: sim {tuple(sim.shape)} and same {tuple(same.shape)} must be (B, B)")

    def draw(scores: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        logits = (scores.float() / temperature).masked_fill(blocked, float("-inf"))
        valid = ~blocked.all(dim=1)
        weights = torch.softmax(logits.masked_fill(~valid[:, None], 0.0), dim=1).masked_fill(blocked, 0.0)
        weights[~valid] = 1.0  # placeholder rows, overwritten below
        idx = torch.multinomial(weights.cpu(), 1, generator=generator).squeeze(1).to(scores.device)
        return torch.where(valid, idx, torch.full_like(idx, -1))

    return draw(sim, same), draw(sim.t(), same.t())
