"""Shared masked-modeling heads: tied MLM head, masked LM loss, tokenizer spec, token decoder."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medvlp.data.masking import IGNORE
from medvlp.data.tokenize import train_wordpiece
from medvlp.errors import ConfigError
from medvlp.models.decoder import MaskedTokenDecoder
from medvlp.models.heads import ItmHead, MlmHead, MlmSpec, masked_lm_loss
from medvlp.models.vit import random_masking


def test_mlm_head_is_tied_to_the_embedding_table_and_stored_once():
    emb = nn.Embedding(11, 6)
    owner = nn.ModuleDict({"emb": emb, "head": MlmHead(4, emb)})
    assert sorted(owner.state_dict()) == ["emb.weight", "head.bias", "head.transform.0.bias", "head.transform.0.weight",
                                          "head.transform.2.bias", "head.transform.2.weight"]
    h = torch.randn(3, 4)
    before = owner["head"](h)
    assert before.shape == (3, 11)
    with torch.no_grad():
        emb.weight[5] += 1.0  # editing the table changes exactly that logit column
    diff = (owner["head"](h) - before).abs().amax(0)
    assert diff[5] > 0 and diff[torch.arange(11) != 5].max() == 0
    owner["head"](h).sum().backward()
    assert emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0


def test_masked_lm_loss_matches_a_hand_computed_cross_entropy():
    emb = nn.Embedding(3, 2)
    head = MlmHead(2, emb)
    with torch.no_grad():  # make the transform the identity-ish: logits = LN(h) @ E^T
        head.transform[0].weight.copy_(torch.eye(2))
        head.transform[0].bias.zero_()
        emb.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    hidden = torch.tensor([[[5.0, -5.0], [9.0, 9.0]]])  # only position 0 is a target
    labels = torch.tensor([[0, IGNORE]])
    z = torch.nn.functional.gelu(torch.tensor([5.0, -5.0]))
    z = (z - z.mean()) / torch.sqrt(z.var(unbiased=False) + 1e-5)
    logits = torch.tensor([z[0], z[1], 0.0])
    expected = -(logits[0] - torch.logsumexp(logits, 0))
    assert math.isclose(masked_lm_loss(head, hidden, labels).item(), expected.item(), rel_tol=1e-5)
    none = masked_lm_loss(head, hidden.requires_grad_(), torch.full((1, 2), IGNORE))
    none.backward()
    assert none.item() == 0.0 and hidden.grad is not None


def test_mlm_spec_reads_the_tokenizer_and_never_masks_special_tokens():
    tok = train_wordpiece(["the heart is enlarged", "no pleural effusion"] * 5, 60)
    spec = MlmSpec.from_tokenizer(tok)
    assert spec.mask_id == tok.mask_token_id and spec.vocab_size == len(tok)
    assert spec.first_ordinary_id > max(tok.all_special_ids)
    enc = tok(["the heart is enlarged"], return_tensors="pt")
    ids = enc["input_ids"]
    words = torch.tensor([[-1 if w is None else w for w in enc.word_ids(0)]])
    masked, labels = spec.mask(ids, words, prob=1.0, generator=torch.Generator().manual_seed(0))
    assert labels[0, 0] == IGNORE and labels[0, -1] == IGNORE  # [CLS], [SEP]
    assert (labels[0, 1:-1] == ids[0, 1:-1]).all()


def test_itm_head_shape():
    assert ItmHead(8)(torch.randn(5, 8)).shape == (5, 2)


def test_decoder_puts_visible_tokens_back_in_place():
    torch.manual_seed(0)
    dec = MaskedTokenDecoder(4, 3, grid_size=2, width=8, depth=1, heads=2)
    x = torch.randn(2, 4, 4)
    visible, mask, _, restore = random_masking(x, 0.5)
    # With all blocks removed the decoder is position-wise: a visible token's output depends
    # only on that token and its position; masked positions get the shared mask token.
    dec.blocks = nn.ModuleList()
    out = dec(visible, restore)
    assert out.shape == (2, 4, 3)
    full = dec(x, torch.arange(4).expand(2, 4))
    keep = mask == 0
    assert torch.allclose(out[keep], full[keep], atol=1e-6)
    hidden = out[mask == 1]
    pos_free = hidden - dec.head(dec.norm(dec.pos.expand(2, -1, -1)[mask == 1] + dec.mask_token[0]))
    assert pos_free.abs().max() < 1e-5


def test_replacement_ids_are_the_longest_run_without_special_tokens():
    """BERT-style vocabularies (specials first, or [PAD] 0 and [UNK]..[MASK] 100-103) draw random
    replacements after the last special; a RoBERTa-style one (``<mask>`` the last id) between its
    leading specials and ``<mask>`` instead of failing on an empty range."""
    from medvlp.models.heads import ordinary_range

    assert ordinary_range([0, 1, 2, 3, 4], 4000) == (5, 4000)  # medvlp's WordPiece
    assert ordinary_range([0, 100, 101, 102, 103], 30522) == (104, 30522)  # bert-base-uncased
    assert ordinary_range([0, 1, 2, 3, 50264], 50265) == (4, 50264)  # roberta-base
    with pytest.raises(ConfigError, match="all special tokens"):
        ordinary_range([0, 1], 2)
    spec = MlmSpec(mask_id=9, vocab_size=10, first_ordinary_id=4, ordinary_end=9)
    ids = torch.full((64, 8), 5)
    words = torch.arange(8).expand(64, 8)
    masked, _ = spec.mask(ids, words, prob=1.0, generator=torch.Generator().manual_seed(0))
    replaced = masked[(masked != 9) & (masked != 5)]
    assert len(replaced) > 10 and int(replaced.min()) >= 4 and int(replaced.max()) <= 8  # never <mask> (9)
