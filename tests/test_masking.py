"""Whole-word masking: special tokens never, whole words together, 80/10/10, reproducible."""
from __future__ import annotations

import pytest
import torch

from medvlp.data.masking import IGNORE, whole_word_mask
from medvlp.data.tokenize import encode_texts, train_wordpiece

MASK, VOCAB, FIRST = 4, 1000, 5


def _batch(b=64, words=20, pieces=2):
    """Sequences of [CLS] w0p0 w0p1 w1p0 ... [SEP] [PAD] [PAD]."""
    n = words * pieces
    ids = torch.randint(FIRST, VOCAB, (b, n + 4))
    ids[:, 0], ids[:, n + 1], ids[:, n + 2:] = 2, 3, 0
    word_ids = torch.full((b, n + 4), -1)
    word_ids[:, 1:n + 1] = torch.arange(n) // pieces
    return ids, word_ids


def test_special_tokens_never_and_whole_words_together():
    ids, word_ids = _batch()
    g = torch.Generator().manual_seed(0)
    masked, labels = whole_word_mask(ids, word_ids, mask_id=MASK, vocab_size=VOCAB, first_ordinary_id=FIRST,
                                     prob=0.3, generator=g)
    special = word_ids < 0
    assert torch.equal(masked[special], ids[special]) and (labels[special] == IGNORE).all()
    target = labels != IGNORE
    assert torch.equal(labels[target], ids[target])
    assert torch.equal(target[:, 1:41:2], target[:, 2:42:2])  # both pieces of a word, or neither
    assert 0.2 < target[~special].float().mean() < 0.4
    assert torch.equal(masked[~target], ids[~target])  # nothing else changes


def test_80_10_10_replacement_and_reproducibility():
    ids, word_ids = _batch(b=256)
    run = lambda seed: whole_word_mask(ids, word_ids, mask_id=MASK, vocab_size=VOCAB, first_ordinary_id=FIRST,
                                       prob=0.5, generator=torch.Generator().manual_seed(seed))
    masked, labels = run(1)
    target = labels != IGNORE
    is_mask = (masked == MASK) & target
    kept = (masked == ids) & target
    replaced = target & ~is_mask & ~kept
    n = target.sum().item()
    assert is_mask.sum() / n == pytest.approx(0.8, abs=0.02)
    assert kept.sum() / n == pytest.approx(0.1, abs=0.02)  # (random draws equal to the original are rare)
    assert replaced.sum() / n == pytest.approx(0.1, abs=0.02)
    assert (masked[replaced] >= FIRST).all()  # random replacements are never special tokens
    again = run(1)
    assert torch.equal(again[0], masked) and torch.equal(again[1], labels) and not torch.equal(run(2)[1], labels)


def test_prob_zero_masks_nothing_and_bad_input_raises():
    ids, word_ids = _batch(b=4)
    masked, labels = whole_word_mask(ids, word_ids, mask_id=MASK, vocab_size=VOCAB, first_ordinary_id=FIRST, prob=0.0)
    assert torch.equal(masked, ids) and (labels == IGNORE).all()
    with pytest.raises(ValueError, match="prob"):
        whole_word_mask(ids, word_ids, mask_id=MASK, vocab_size=VOCAB, first_ordinary_id=FIRST, prob=1.5)


def test_with_the_project_tokenizer_word_ids():
    texts = ["Moderate cardiomegaly with bilateral pleural effusions.", "No pneumothorax."]
    tok = train_wordpiece(texts * 3, 60)  # a tiny vocabulary: long words split into pieces
    enc = encode_texts(tok, texts, 24)
    mask_id = tok.convert_tokens_to_ids("[MASK]")
    masked, labels = whole_word_mask(enc["input_ids"], enc["word_ids"], mask_id=mask_id, vocab_size=len(tok),
                                     first_ordinary_id=5, prob=1.0, generator=torch.Generator().manual_seed(0))
    words = enc["word_ids"] >= 0
    assert torch.equal(labels != IGNORE, words)  # prob 1: every word-piece, no special token
    assert torch.equal(masked[~words], enc["input_ids"][~words]) and (masked[words] == mask_id).any()
