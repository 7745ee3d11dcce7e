"""CLIP / ConVIRT: symmetric InfoNCE between image and report embeddings.

L = 1/2 [CE(s_i., i) + CE(s_.k, k)] with s_ik = v_i . w_k / tau over the in-batch pairs
(all-gathered across ranks, see :mod:`medvlp.distributed`). What is learned is
log(1/tau), starting at tau = 0.07; the scale 1/tau is clamped to at most
``max_logit_scale`` and kept in fp32. Identical report texts are not treated as
negatives of each other (``mask_identical_texts``). Only samples that have a report
(``batch.has_text``) enter the loss.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from medvlp.config import MethodConfig
from medvlp.losses.contrastive import ClipLoss
from medvlp.methods.base import Method, build_towers, projection
from medvlp.registry import METHODS


@dataclass
class SharedSpaceConfig(MethodConfig):
    """The keys of the shared image-text space that every contrastive recipe has, with CLIP's
    defaults (a recipe's config subclasses this and adds its own keys)."""

    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    learn_temperature: bool = True
    projection: Literal["linear", "mlp"] = "linear"
    gather_with_grad: bool = True
    mask_identical_texts: bool = True

    def validate(self, prefix: str) -> None:
        from medvlp.errors import ConfigError

        if not 0 < self.init_temperature < 1:
            raise ConfigError(f"{prefix}.init_temperature: must be within (0, 1), got {self.init_temperature}")
        if self.max_logit_scale < 1 / self.init_temperature:
            raise ConfigError(f"{prefix}.max_logit_scale: must be >= 1/init_temperature ({1 / self.init_temperature:.1f})")


@dataclass
class ClipConfig(SharedSpaceConfig):
    name: str = "clip"
    local_loss: bool = False


class SharedSpace:
    """Mixin for methods with CLIP's shared space: the two projections, the learned log(1/tau)
    (1/tau clamped to ``max_logit_scale``, kept in fp32) and its clamp after each optimizer step.
    The attribute names (``image_proj``, ``text_proj``, ``logit_scale``) are what checkpoints hold."""

    def build_shared_space(self, cfg) -> None:
        m = cfg.method
        self.image_proj = projection(self.vision.width, cfg.model.embed_dim, m.projection)
        self.text_proj = projection(self.text.width, cfg.model.embed_dim, m.projection)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / m.init_temperature)),
                                        requires_grad=m.learn_temperature)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.float().exp().clamp(max=self.cfg.max_logit_scale)

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        self.logit_scale.clamp_(0, math.log(self.cfg.max_logit_scale))

    def word_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, D): the text projection on every last-layer token state, L2-normalised (the
        space GLoRIA / MGCA / MLIP align words with patches in; for CLIP it is untrained there)."""
        return F.normalize(self.text_proj(self.text(input_ids, attention_mask).tokens), dim=-1)


def text_hashes(texts: list[str], device: torch.device) -> torch.Tensor:
    """A stable 63-bit hash per text (whitespace- and case-normalised), to find duplicates across ranks."""
    vals = [int.from_bytes(hashlib.blake2b(" ".join(t.lower().split()).encode(), digest_size=8).digest(), "little") >> 1
            for t in texts]
    return torch.tensor(vals, dtype=torch.long, device=device)


@METHODS.register("clip", ClipConfig, "CLIP / ConVIRT: symmetric image-report InfoNCE")
class Clip(SharedSpace, Method):
    def __init__(self, cfg, tokenizer, *, load_text_weights: bool = True):
        super().__init__()
        mcfg: ClipConfig = cfg.method
        self.cfg = mcfg
        self.vision, self.text = build_towers(cfg, tokenizer, load_text_weights=load_text_weights)
        self.build_shared_space(cfg)
        self.loss_fn = ClipLoss(gather_with_grad=mcfg.gather_with_grad, local_loss=mcfg.local_loss)

    # ------------------------------------------------------------------ encoders
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image_features(images)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(input_ids, attention_mask).pooled), dim=-1)

    def patch_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        # the global image projection applied to every patch token: the space the prompts live in
        return F.normalize(self.image_proj(self.vision(images).tokens), dim=-1)

    # ------------------------------------------------------------------ training
    def forward(self, batch) -> dict[str, torch.Tensor]:
        keep = batch.has_text
        if not bool(keep.all()):
            # Every rank must contribute the same number of rows to the gather; datasets
            # with image-only samples need a method that uses them (e.g. MaskedCLIP).
            raise ValueError("CLIP needs a report for every sample; filter image-only samples or use a semi-supervised method")
        img = self.encode_image(batch.images)
        txt = self.encode_text(batch.input_ids, batch.attention_mask)
        scale = self.scale()
        keys = text_hashes(batch.texts, img.device) if self.cfg.mask_identical_texts else None
        loss = self.loss_fn(img, txt, scale, pair_keys=keys)
        return {"loss": loss, "loss_clip": loss.detach(), "logit_scale": scale.detach()}

    def after_optimizer_step(self, step: int) -> None:
        self.clamp_logit_scale()
