"""Prompt learner: context vectors + live class-name embeddings; prompt tuning trains only ctx."""
from __future__ import annotations

import pytest
import torch

from medvlp.config import TextConfig
from medvlp.data.tokenize import train_wordpiece
from medvlp.models.prompts import PromptLearner
from medvlp.models.text import build_text_encoder

REPORTS = ["cardiomegaly with pleural effusion.", "a chest x-ray showing pneumothorax.", "no edema.",
           "small nodule in the right upper lobe.", "a chest x-ray showing atelectasis."] * 5
CLASSES = ["cardiomegaly", "pleural effusion", "pneumothorax"]


@pytest.fixture(scope="module")
def parts():
    tok = train_wordpiece(REPORTS, vocab_size=200)
    torch.manual_seed(0)
    text = build_text_encoder(TextConfig(name="bert", width=32, depth=1, heads=2, max_length=32, dropout=0.0), tok)
    return tok, text


def test_layout_context_and_live_class_tokens(parts):
    tok, text = parts
    emb = text.get_input_embeddings()
    learner = PromptLearner(tok, CLASSES, emb, n_ctx=3)
    embeds, mask = learner(emb)
    assert embeds.shape[:2] == mask.shape and embeds.shape[0] == 3 and learner.ctx.shape == (3, 32)
    assert torch.equal(embeds[:, 1:4], learner.ctx.detach().expand(3, -1, -1))
    ids = learner.token_ids
    assert (ids[:, 0] == tok.cls_token_id).all()
    name = tok("pleural effusion", add_special_tokens=False)["input_ids"]
    assert ids[1, 4 : 4 + len(name)].tolist() == name
    assert torch.equal(embeds[1, 4], emb.weight[name[0]])
    with torch.no_grad():  # the table is read live, not cached
        emb.weight[name[0]] += 1.0
    assert torch.equal(learner(emb)[0][1, 4], emb.weight[name[0]])
    with torch.no_grad():
        emb.weight[name[0]] -= 1.0
    sep = (ids == tok.sep_token_id).float().argmax(1)
    assert all(mask[i, : sep[i] + 1].all() and not mask[i, sep[i] + 1 :].any() for i in range(3))


def test_prompt_tuning_trains_only_the_context(parts):
    tok, text = parts
    emb = text.get_input_embeddings()
    learner = PromptLearner(tok, CLASSES, emb, n_ctx=2, class_specific=True)
    for p in text.parameters():
        p.requires_grad_(False)
    before_text = {n: p.clone() for n, p in text.named_parameters()}
    ctx0 = learner.ctx.detach().clone()
    opt = torch.optim.SGD(learner.parameters(), lr=1.0)
    target = torch.randn(3, 32)
    losses = []
    for _ in range(20):
        embeds, mask = learner(emb)
        pooled = text(inputs_embeds=embeds, attention_mask=mask).pooled
        loss = (pooled - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(learner.ctx.detach(), ctx0) and learner.ctx.shape == (3, 2, 32)
    assert all(torch.equal(p, before_text[n]) for n, p in text.named_parameters())
    assert [n for n, _ in learner.named_parameters()] == ["ctx"]
    for p in text.parameters():
        p.requires_grad_(True)


def test_phrase_initialisation(parts):
    tok, text = parts
    emb = text.get_input_embeddings()
    learner = PromptLearner(tok, CLASSES, emb, init="a chest x-ray showing")
    phrase = tok("a chest x-ray showing", add_special_tokens=False)["input_ids"]
    assert learner.n_ctx == len(phrase) and torch.equal(learner.ctx.detach(), emb.weight[phrase])
    with pytest.raises(ValueError, match="class names"):
        PromptLearner(tok, [], emb)
