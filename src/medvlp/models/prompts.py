"""Continuous prompts (CoOp-style): learnable context vectors + class-name tokens -> text inputs.

``PromptLearner`` builds, for every class, the text encoder's input embeddings

    [CLS] ctx_1 ... ctx_n <class-name tokens> . [SEP] [PAD] ...

where ``ctx`` are learnable vectors (shared by all classes, or one set per class) and the
class-name tokens are looked up in the text encoder's *live* embedding table at every call
(the table trains during pre-training, so nothing is cached). It owns only the context
vectors: the text model is passed to :meth:`PromptLearner.forward` (its embedding table), never
stored or edited, so prompt tuning that trains only ``ctx`` is a matter of which parameters the
optimizer gets. Position embeddings are added by the text model from ``inputs_embeds``.

Initialisation: ``"random"`` (N(0, 0.02), CoOp) or a phrase such as ``"a chest x-ray showing"``,
whose token embeddings become the initial context (``n_ctx`` = the phrase's token count).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class PromptLearner(nn.Module):
    def __init__(self, tokenizer, class_names: Sequence[str], embedding: nn.Embedding, *, n_ctx: int = 4,
                 class_specific: bool = False, init: str = "random", suffix: str = "."):
        super().__init__()
        if not class_names:
            raise ValueError("PromptLearner: no class names")
        width = embedding.embedding_dim
        if init == "random":
            if n_ctx < 1:
                raise ValueError(f"PromptLearner: n_ctx must be >= 1, got {n_ctx}")
            ctx = torch.randn(n_ctx, width) * 0.02
        else:
            phrase = _ids(tokenizer, init)
            if not phrase:
                raise ValueError(f"PromptLearner: the init phrase {init!r} has no tokens")
            with torch.no_grad():
                ctx = embedding.weight[torch.tensor(phrase)].detach().clone().float()
            n_ctx = len(phrase)
        if class_specific:
            ctx = ctx.unsqueeze(0).repeat(len(class_names), 1, 1)
        self.ctx = nn.Parameter(ctx)
        self.n_ctx, self.class_names, self.class_specific = n_ctx, list(class_names), class_specific

        cls_id, sep_id, pad_id = (tokenizer.convert_tokens_to_ids(t) for t in
                                  (tokenizer.cls_token, tokenizer.sep_token, tokenizer.pad_token))
        rows = [[cls_id] + [pad_id] * n_ctx + _ids(tokenizer, name) + _ids(tokenizer, suffix) + [sep_id]
                for name in self.class_names]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("attention_mask", mask, persistent=False)
        ctx_pos = torch.zeros(length, dtype=torch.bool)
        ctx_pos[1 : 1 + n_ctx] = True
        self.register_buffer("ctx_positions", ctx_pos, persistent=False)

    def forward(self, embedding: nn.Embedding) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs_embeds (C, L, W), attention_mask (C, L))`` for every class."""
        tokens = embedding(self.token_ids)  # live table: gradients reach it if it trains
        c = tokens.shape[0]
        ctx = self.ctx if self.class_specific else self.ctx.unsqueeze(0).expand(c, -1, -1)
        full = torch.zeros_like(tokens)
        full[:, self.ctx_positions] = ctx.to(tokens.dtype)
        embeds = torch.where(self.ctx_positions[None, :, None], full, tokens)
        return embeds, self.attention_mask
