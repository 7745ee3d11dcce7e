"""Whole-word masking for masked language modeling (BERT's 80/10/10 recipe).

Words are chosen, not tokens: every word-piece of a chosen word is a prediction target, using
the word ids the tokenizer keeps in every batch (``Batch.word_ids``, -1 for special and padding
tokens, which are never chosen). Each target token is then replaced by [MASK] with probability
0.8, by a random ordinary token with 0.1, and left as it is with 0.1. Vectorised; every draw
comes from the ``generator`` passed in, so masking is reproducible.
"""
from __future__ import annotations

import torch

IGNORE = -100  # label of tokens that are not prediction targets (cross_entropy's ignore_index)


def whole_word_mask(input_ids: torch.Tensor, word_ids: torch.Tensor, *, mask_id: int, vocab_size: int,
                    first_ordinary_id: int, prob: float = 0.15, generator: torch.Generator | None = None,
                    ordinary_end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask whole words of a (B, L) batch.

    Args:
        input_ids: (B, L) token ids.
        word_ids: (B, L) word index of each token within its sequence, -1 for special/padding.
        mask_id: the [MASK] token id.
        vocab_size: size of the vocabulary; random replacements are drawn from
            ``[first_ordinary_id, ordinary_end)`` (``ordinary_end`` defaults to ``vocab_size``) so
            they are never special tokens.
        prob: probability that a word is chosen.
    Returns ``(masked_ids, labels)``: the corrupted ids and (B, L) labels holding the original
    id at target positions and :data:`IGNORE` elsewhere.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"whole_word_mask: prob must be within [0, 1], got {prob}")
    if input_ids.shape != word_ids.shape:
        raise ValueError(f"whole_word_mask: input_ids {tuple(input_ids.shape)} and word_ids {tuple(word_ids.shape)} differ")
    device = input_ids.device
    n_words = int(word_ids.max().item()) + 1 if word_ids.numel() else 0
    b = input_ids.shape[0]
    chosen_words = torch.rand(b, max(n_words, 1), generator=generator).to(device) < prob
    is_word = word_ids >= 0
    targets = torch.gather(chosen_words, 1, word_ids.clamp(min=0)) & is_word
    r = torch.rand(input_ids.shape, generator=generator).to(device)
    end = vocab_size if ordinary_end is None else ordinary_end
    if not 0 <= first_ordinary_id < end <= vocab_size:
        raise ValueError(f"whole_word_mask: no ordinary ids to draw replacements from: [{first_ordinary_id}, {end}) "
                         f"within a vocabulary of {vocab_size}")
    random_ids = torch.randint(first_ordinary_id, end, input_ids.shape, generator=generator).to(device)
    masked = torch.where(targets & (r < 0.8), torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(targets & (r >= 0.8) & (r < 0.9), random_ids, masked)
    labels = torch.where(targets, input_ids, torch.full_like(input_ids, IGNORE))
    return masked, labels
