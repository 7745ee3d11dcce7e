"""MPMA: multi-task paired masking with alignment (METHODS.md section 5) = M3AE + GLA + memory.

Everything of :class:`~medvlp.methods.m3ae.M3ae` (paired masking of image and report in the
same step, co-attention fusion, L_MIM, L_MLM, ITM), plus:

- memory-augmented fusion: the report stream's cross-attention keys/values are extended by
  ``memory_slots`` learnable slots (:class:`~medvlp.models.fusion.FusionEncoder`);
- GLA, global: symmetric InfoNCE (:class:`~medvlp.losses.contrastive.ClipLoss`, learned
  logit scale as in CLIP, identical reports not negatives) between projections of the unimodal
  pooled outputs of the *masked* views (FLIP-style: no extra unmasked pass in training);
- GLA, local: token-patch alignment between the projected report word tokens and the visible
  patch tokens (:mod:`medvlp.losses.local`: ``mgca`` with token importance from the encoders'
  last-layer [CLS] attention, or ``gloria``); MLM targets are not words of the report as the
  encoder saw it, so they are left out;
- ITM negatives are drawn from the (detached) global similarity matrix (ALBEF-style hard
  negatives) instead of uniformly.

L = L_MIM + L_MLM + global_weight * L_global + local_weight * L_local + itm_weight * L_ITM.
For evaluation MPMA is a dual encoder: ``encode_image`` / ``encode_text`` run the unmasked
encoders and projections, so zero-shot and retrieval apply.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from medvlp.data.masking import IGNORE
from medvlp.errors import ConfigError
from medvlp.losses.contrastive import ClipLoss
from medvlp.losses.local import gloria_local_loss, mgca_local_loss
from medvlp.methods.clip import SharedSpace, SharedSpaceConfig, text_hashes
from medvlp.methods.m3ae import M3ae, M3aeConfig, MaskedViews
from medvlp.registry import METHODS


@dataclass
class MpmaConfig(M3aeConfig, SharedSpaceConfig):
    name: str = "mpma"
    memory_slots: int = 32
    global_weight: float = 1.0
    local_weight: float = 0.5
    local_variant: Literal["mgca", "gloria"] = "mgca"
    local_tau: float = 0.1
    local_loss: bool = False

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.memory_slots < 0:
            raise ConfigError(f"{prefix}.memory_slots: must be >= 0 (0 = plain co-attention), got {self.memory_slots}")
        if self.global_weight <= 0:
            raise ConfigError(f"{prefix}.global_weight: must be > 0 (MPMA's zero-shot and retrieval use the global "
                              f"space; for reconstruction without alignment use method.name=m3ae), got {self.global_weight}")
        if self.local_weight < 0:
            raise ConfigError(f"{prefix}.local_weight: must be >= 0 (0 turns local alignment off), got {self.local_weight}")
        if self.local_tau <= 0:
            raise ConfigError(f"{prefix}.local_tau: must be > 0, got {self.local_tau}")
        SharedSpaceConfig.validate(self, prefix)


@METHODS.register("mpma", MpmaConfig, "MPMA: M3AE-style paired masking + memory-augmented fusion + global/local alignment")
class Mpma(SharedSpace, M3ae):
    supports_text = True

    def __init__(self, cfg, tokenizer, *, load_text_weights: bool = True):
        super().__init__(cfg, tokenizer, load_text_weights=load_text_weights)
        m: MpmaConfig = self.cfg
        self.build_shared_space(cfg)
        self.loss_fn = ClipLoss(gather_with_grad=m.gather_with_grad, local_loss=m.local_loss)

    # ------------------------------------------------------------------ encoders (unmasked)
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image_features(images)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(input_ids, attention_mask).pooled), dim=-1)

    def patch_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        # the global image projection on the unmasked patch tokens, as the local alignment uses it
        return F.normalize(self.image_proj(self.vision(images).tokens), dim=-1)

    # ------------------------------------------------------------------ M3AE hooks
    def _fusion_memory_slots(self) -> int:
        return self.cfg.memory_slots

    def _wants_attention(self) -> bool:
        return self.cfg.local_weight > 0 and self.cfg.local_variant == "mgca"

    def _alignment(self, batch, views: MaskedViews):
        m = self.cfg
        img = F.normalize(self.image_proj(views.vision.pooled), dim=-1)
        txt = F.normalize(self.text_proj(views.text.pooled), dim=-1)
        scale = self.scale()
        keys = text_hashes(batch.texts, img.device) if m.mask_identical_texts else None
        terms = {"global": (m.global_weight, self.loss_fn(img, txt, scale, pair_keys=keys))}
        if m.local_weight > 0:
            terms["local"] = (m.local_weight, self._local_loss(batch, views))
        sim = (img.float() @ txt.float().t() * scale).detach()  # ALBEF: softmax(s_ik / tau) ranks negatives
        return terms, {"logit_scale": scale.detach()}, sim

    def _local_loss(self, batch, views: MaskedViews) -> torch.Tensor:
        words = self.text_proj(views.text.tokens)
        patches = self.image_proj(views.vision.tokens)
        real = batch.word_ids >= 0
        word_mask = real & (views.mlm_labels == IGNORE)  # MLM-corrupted tokens are not the report's words
        # a report whose every word was chosen by MLM (short reports, high text_mask_prob) keeps them all
        word_mask = torch.where(word_mask.any(dim=1, keepdim=True), word_mask, real)
        if self.cfg.local_variant == "gloria":
            return gloria_local_loss(words, word_mask, patches)
        # importance is a weighting, not a target: detached so attention is not trained to game the loss
        word_importance = views.text.cls_attention.mean(dim=1).detach()
        patch_importance = views.vision.cls_attention.mean(dim=1).detach()
        return mgca_local_loss(words, word_mask, patches, word_importance=word_importance,
                               patch_importance=patch_importance, tau=self.cfg.local_tau)

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        self.clamp_logit_scale()


__all__ = ["Mpma", "MpmaConfig"]
