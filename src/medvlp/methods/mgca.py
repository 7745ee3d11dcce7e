"""MGCA baseline (METHODS.md "Baselines"): global InfoNCE + token-level local alignment +
prototype-level (cross-modal cluster) alignment.

On :class:`~medvlp.methods.gloria.GlobalLocal` (CLIP's global term, global projections reused
for tokens):

- local: :func:`~medvlp.losses.local.mgca_local_loss` within each image-report pair (word
  tokens vs patch tokens and back, tau ``local_tau``), each token weighted by its importance =
  the encoders' last-layer [CLS] attention averaged over heads. ``detach_importance`` (default
  true) stops gradient through the weights: they weight the loss, and letting the attention
  be trained by it would reward attending to easy tokens (MPMA makes the same choice);
- prototypes: ``num_prototypes`` learnable unit vectors shared by both modalities; each
  modality's (B, K) cosine scores get Sinkhorn codes (no gradient, ``sinkhorn_eps``,
  ``sinkhorn_iters``, column sums all-reduced across ranks) and each modality predicts the
  other's codes (:func:`~medvlp.losses.prototypes.swapped_prediction_loss`, temperature
  ``proto_temperature``). ``num_prototypes: 0`` picks min(500, data.batch_size): at most the
  global batch (K = 500 with batch 64 gives near-uniform codes, METHODS.md), and independent
  of the number of ranks so a checkpoint's shape does not depend on how it was trained.

L = global_weight * L_global + local_weight * L_local + proto_weight * L_proto (1 / 0.7 / 0.5).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medvlp.distributed import get_world_size
from medvlp.errors import ConfigError
from medvlp.losses.local import mgca_local_loss
from medvlp.losses.prototypes import sinkhorn, swapped_prediction_loss
from medvlp.methods.gloria import GlobalLocal, GlobalLocalConfig, report_words
from medvlp.registry import METHODS

MAX_PROTOTYPES = 500


@dataclass
class MgcaConfig(GlobalLocalConfig):
    name: str = "mgca"
    local_weight: float = 0.7
    local_tau: float = 0.1
    detach_importance: bool = True
    proto_weight: float = 0.5
    num_prototypes: int = 0  # 0 = min(500, data.batch_size)
    proto_temperature: float = 0.2
    sinkhorn_eps: float = 0.05
    sinkhorn_iters: int = 3

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        for key in ("local_tau", "proto_temperature", "sinkhorn_eps"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{prefix}.{key}: must be > 0, got {getattr(self, key)}")
        if self.proto_weight < 0:
            raise ConfigError(f"{prefix}.proto_weight: must be >= 0 (0 turns prototypes off), got {self.proto_weight}")
        if self.num_prototypes < 0 or self.num_prototypes == 1:
            raise ConfigError(f"{prefix}.num_prototypes: must be 0 (= min(500, data.batch_size)) or >= 2, "
                              f"got {self.num_prototypes}")
        if self.sinkhorn_iters < 1:
            raise ConfigError(f"{prefix}.sinkhorn_iters: must be >= 1, got {self.sinkhorn_iters}")


@METHODS.register("mgca", MgcaConfig, "MGCA: global InfoNCE + token-level and prototype-level cross-modal alignment")
class Mgca(GlobalLocal):
    # prototypes are normalised in the forward pass: decay would only shrink their norm
    no_weight_decay = (*GlobalLocal.no_weight_decay, "prototypes")

    def __init__(self, cfg, tokenizer, *, load_text_weights: bool = True):
        super().__init__(cfg, tokenizer, load_text_weights=load_text_weights)
        m: MgcaConfig = self.cfg
        self.prototypes, self.batch_size = None, cfg.data.batch_size
        if m.proto_weight > 0:  # no parameter that would never get a gradient (DDP would complain)
            k = m.num_prototypes or min(MAX_PROTOTYPES, cfg.data.batch_size)
            self.prototypes = nn.Parameter(torch.randn(k, cfg.model.embed_dim) * cfg.model.embed_dim ** -0.5)

    def _wants_attention(self) -> bool:
        return self.cfg.local_weight > 0

    def _local_loss(self, batch, vision, text) -> torch.Tensor:
        m = self.cfg
        tokens, word_mask = report_words(batch, text.tokens)
        word_importance = text.cls_attention[:, :, : tokens.shape[1]].mean(dim=1)
        patch_importance = vision.cls_attention.mean(dim=1)
        if m.detach_importance:
            word_importance, patch_importance = word_importance.detach(), patch_importance.detach()
        return mgca_local_loss(self.text_proj(tokens), word_mask, self.image_proj(vision.tokens),
                               word_importance=word_importance, patch_importance=patch_importance, tau=m.local_tau)

    def _extra_terms(self, img: torch.Tensor, txt: torch.Tensor) -> dict[str, tuple[float, torch.Tensor]]:
        if self.prototypes is None:
            return {}
        m = self.cfg
        rows = self.batch_size * get_world_size()  # the global batch (data.batch_size rows per rank)
        if self.training and self.prototypes.shape[0] > rows:
            raise ConfigError(
                f"method.num_prototypes: {self.prototypes.shape[0]} prototypes but the global batch has {rows} rows; "
                "with more prototypes than rows Sinkhorn's equal shares make the codes near uniform (METHODS.md). "
                f"Fix: set method.num_prototypes <= {rows} (0 picks min(500, data.batch_size)), or a larger batch")
        protos = F.normalize(self.prototypes, dim=-1)  # unit prototypes without an in-place step
        img_scores, txt_scores = img.float() @ protos.float().t(), txt.float() @ protos.float().t()
        img_codes = sinkhorn(img_scores, eps=m.sinkhorn_eps, iters=m.sinkhorn_iters)
        txt_codes = sinkhorn(txt_scores, eps=m.sinkhorn_eps, iters=m.sinkhorn_iters)
        loss = swapped_prediction_loss(img_scores, txt_scores, img_codes, txt_codes, temperature=m.proto_temperature)
        return {"proto": (m.proto_weight, loss)}


__all__ = ["Mgca", "MgcaConfig"]
