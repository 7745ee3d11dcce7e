"""Prediction heads shared by the masked-modeling recipes: MLM (tied to the input embeddings)
and image-text matching (ITM), plus the tokenizer facts MLM masking needs.

- :class:`MlmHead`: BERT's prediction head, ``dense -> GELU -> LayerNorm -> logits``, whose
  output matrix *is* the text encoder's input embedding table (weight tying; only a bias is
  its own). The table is held by reference, not registered as a submodule, so it appears once
  in ``state_dict`` (safetensors refuses shared tensors) and the optimizer sees it once.
- :func:`masked_lm_loss`: cross-entropy over the target positions only (labels != -100);
  logits are computed only there, which saves the (B, L, V) product.
- :class:`MlmSpec`: [MASK] id, vocabulary size and the first id that is not special, read
  from the tokenizer, for :func:`medvlp.data.masking.whole_word_mask`.
- :class:`ItmHead`: a two-way classifier (match / no match) on a fused representation.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from medvlp.data.masking import IGNORE, whole_word_mask
from medvlp.errors import ConfigError


@dataclass(frozen=True)
class MlmSpec:
    mask_id: int
    vocab_size: int
    first_ordinary_id: int
    ordinary_end: int | None = None  # random replacements come from [first_ordinary_id, ordinary_end)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> MlmSpec:
        if tokenizer is None or tokenizer.mask_token_id is None:
            raise ConfigError("masked language modeling needs a tokenizer with a [MASK] token "
                              "(medvlp's WordPiece tokenizer or a BERT-style Hugging Face tokenizer)")
        vocab = len(tokenizer)
        first, end = ordinary_range([i for i in tokenizer.all_special_ids if i is not None], vocab)
        return cls(int(tokenizer.mask_token_id), vocab, first, end)

    def mask(self, input_ids: torch.Tensor, word_ids: torch.Tensor, prob: float,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole-word 80/10/10 masking of a batch: (masked ids, labels with -100 off-target)."""
        if word_ids is None:
            raise ValueError("MLM needs batch.word_ids (the collator provides them for every report)")
        return whole_word_mask(input_ids, word_ids, mask_id=self.mask_id, vocab_size=self.vocab_size,
                               first_ordinary_id=self.first_ordinary_id, prob=prob, generator=generator,
                               ordinary_end=self.ordinary_end)


def ordinary_range(special_ids, vocab_size: int) -> tuple[int, int]:
    """The longest run ``[first, end)`` of ids holding no special token, where MLM's random
    replacements are drawn: ``[max special + 1, vocab)`` for BERT-style vocabularies (specials
    first), ``[4, <mask>)`` for RoBERTa-style ones whose ``<mask>`` is the last id."""
    cuts = sorted({-1, vocab_size, *(int(i) for i in special_ids if 0 <= int(i) < vocab_size)})
    first, end = max(((a + 1, b) for a, b in pairwise(cuts)), key=lambda r: (r[1] - r[0], r[0]))
    if end - first < 1:
        raise ConfigError(f"masked language modeling: the tokenizer's {vocab_size} ids are all special tokens")
    return first, end


class MlmHead(nn.Module):
    """``forward(hidden (M, in_width)) -> logits (M, vocab)`` with the output matrix tied to
    ``embeddings.weight`` (V, E)."""

    def __init__(self, in_width: int, embeddings: nn.Embedding):
        super().__init__()
        dim = embeddings.weight.shape[1]
        self.transform = nn.Sequential(nn.Linear(in_width, dim), nn.GELU(), nn.LayerNorm(dim))
        self.bias = nn.Parameter(torch.zeros(embeddings.weight.shape[0]))
        object.__setattr__(self, "_embeddings", embeddings)  # a reference, not a submodule

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self._embeddings.weight
        return F.linear(self.transform(hidden), weight.to(hidden.dtype), self.bias.to(hidden.dtype))


def masked_lm_loss(head: MlmHead, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy at the target tokens of ``hidden`` (B, L, D) with ``labels`` (B, L)
    (-100 elsewhere); fp32 logits. Zero, with a gradient path, when there is no target."""
    target = labels != IGNORE
    if not bool(target.any()):
        return hidden.sum() * 0.0 + sum(p.sum() for p in head.parameters()) * 0.0
    logits = head(hidden[target]).float()
    return F.cross_entropy(logits, labels[target])


class ItmHead(nn.Module):
    """Match / no-match logits (M, 2) from a fused representation (M, in_width)."""

    def __init__(self, in_width: int):
        super().__init__()
        self.fc = nn.Linear(in_width, 2)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return self.fc(fused)
