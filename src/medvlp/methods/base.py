"""The contract every pre-training method follows.

A method is an ``nn.Module`` that owns its encoders and heads and turns a
:class:`~medvlp.data.sample.Batch` into named losses:

``forward(batch) -> dict[str, Tensor]``: the entry ``"loss"`` is the objective the
training loop back-propagates; every other entry is a detached scalar for logging
(its weighted loss terms and metrics such as the logit scale).

``after_optimizer_step(step)`` runs once per optimizer step (not per micro-batch), for
EMA teachers and momentum updates. A method never reaches into the training loop.

For evaluation every method exposes ``encode_image`` / ``encode_text`` returning
L2-normalised embeddings in the shared space.
"""
from __future__ import annotations

import torch
from torch import nn


class Method(nn.Module):
    #: parameter-name substrings that get no weight decay (besides biases and norms)
    no_weight_decay: tuple[str, ...] = ("logit_scale", "cls_token", "pos_embed")

    def forward(self, batch) -> dict[str, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def after_optimizer_step(self, step: int) -> None:
        """Hook for EMA / momentum updates; called once per optimizer step."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError
