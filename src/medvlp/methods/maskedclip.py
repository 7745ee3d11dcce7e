"""MaskedCLIP: masked image modeling + CLIP + masked knowledge distillation, for paired
image-report data plus unpaired images (METHODS.md section 1).

Five modules: the image encoder E_v (the shared ViT), a bridge transformer B (a few
transformer blocks over E_v's [CLS] + patch tokens, at the vision width, then a LayerNorm),
the text encoder E_t, an image decoder and a feature decoder (both
:class:`~medvlp.models.decoder.MaskedTokenDecoder`). Per step:

- every image, paired or not: E_v encodes a random 25 % of its patches; the image decoder
  predicts the pixels of the hidden ones (L_MIM, normalised-pixel MSE, as MAE);
- the feature decoder, from the same visible tokens, predicts a CLIP-space feature at every
  patch position; the target is B(E_v(x_full)) from an EMA teacher copy of (E_v, B), and
  L_MKD = mean over hidden positions of 1 - cos (or smooth-L1) (:mod:`medvlp.losses.distill`);
- paired samples only (``batch.has_text``): L_CLIP = InfoNCE(g_v(B(E_v(x_full))[CLS]),
  g_t(E_t(t))) with the learned temperature of CLIP (:mod:`medvlp.methods.clip`).

L = mim_weight L_MIM + clip_weight L_CLIP + mkd_weight L_MKD. The student's full-image pass
is run only for the paired samples and serves only CLIP; the teacher's full pass runs without
gradient. The mixed stream (``data.sources``) gives every rank the same number of paired
samples per batch, so CLIP's cross-rank gather stays aligned.

Known (paper): the five modules, MIM + CLIP trained together, the bridge from the masked
feature space to the CLIP space, and distillation of the unmasked image's CLIP-space features
into features predicted from the masked image. Everything else (sizes, EMA teacher, losses'
forms, weights) is this project's reconstruction; docs/methods/maskedclip.md lists which.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from medvlp.errors import ConfigError
from medvlp.losses.contrastive import ClipLoss
from medvlp.losses.distill import masked_feature_distill
from medvlp.losses.reconstruction import masked_patch_mse
from medvlp.methods.base import Method, build_towers
from medvlp.methods.clip import SharedSpace, SharedSpaceConfig, text_hashes
from medvlp.models.ema import EmaTeacher, cosine_momentum
from medvlp.registry import METHODS


@dataclass
class MaskedClipConfig(SharedSpaceConfig):
    name: str = "maskedclip"
    # masked image modeling (MAE's choices)
    mask_ratio: float = 0.75
    norm_pix: bool = True
    decoder_width: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    # bridge and feature decoder
    bridge_depth: int = 2
    feature_decoder_width: int = 64
    feature_decoder_depth: int = 1
    feature_decoder_heads: int = 4
    # masked knowledge distillation
    mkd_loss: Literal["cosine", "smooth_l1"] = "cosine"
    mkd_beta: float = 0.1
    ema_momentum: float = 0.996
    ema_schedule: Literal["cosine", "constant"] = "cosine"
    # CLIP (same keys and defaults as the clip recipe)
    local_loss: bool = False
    # loss weights
    mim_weight: float = 1.0
    clip_weight: float = 1.0
    mkd_weight: float = 1.0

    def validate(self, prefix: str) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"{prefix}.mask_ratio: must be within (0, 1), got {self.mask_ratio} (MAE uses 0.75)")
        for name in ("decoder", "feature_decoder"):
            width, depth, heads = (getattr(self, f"{name}_{k}") for k in ("width", "depth", "heads"))
            if depth < 1 or heads < 1 or width < 1 or width % heads:
                raise ConfigError(f"{prefix}.{name}_width ({width}) must be divisible by {prefix}.{name}_heads "
                                  f"({heads}), and {prefix}.{name}_depth ({depth}) must be >= 1")
        if self.bridge_depth < 1:
            raise ConfigError(f"{prefix}.bridge_depth: must be >= 1, got {self.bridge_depth} (the bridge is one of "
                              "MaskedCLIP's five modules)")
        if not self.mkd_beta > 0:
            raise ConfigError(f"{prefix}.mkd_beta: must be > 0, got {self.mkd_beta}")
        if not 0.0 <= self.ema_momentum <= 1.0:
            raise ConfigError(f"{prefix}.ema_momentum: must be within [0, 1], got {self.ema_momentum} (e.g. 0.996)")
        super().validate(prefix)
        for name in ("mim_weight", "clip_weight", "mkd_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name}: must be >= 0, got {getattr(self, name)}")


class Bridge(nn.Module):
    """``depth`` pre-norm transformer blocks + LayerNorm over (B, 1 + N, D) [CLS] + patch tokens."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float):
        super().__init__()
        from medvlp.models.vit import Block

        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, 0.0) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens, _ = block(tokens)
        return self.norm(tokens)


class ImageBranch(nn.Module):
    """B(E_v(x)): the full image's CLIP-space tokens (B, 1 + N, D), [CLS] first. It only
    groups the two modules, so the EMA teacher copies exactly (E_v, B)."""

    def __init__(self, vision: nn.Module, bridge: Bridge):
        super().__init__()
        self.vision = vision
        self.bridge = bridge

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.vision(images)
        return self.bridge(torch.cat([out.pooled.unsqueeze(1), out.tokens], dim=1))


@METHODS.register("maskedclip", MaskedClipConfig,
                  "MaskedCLIP: MIM + CLIP through a bridge + masked feature distillation (paired + unpaired images)")
class MaskedClip(SharedSpace, Method):
    no_weight_decay = (*Method.no_weight_decay, "mask_token")

    def __init__(self, cfg, tokenizer, *, load_text_weights: bool = True):
        super().__init__()
        from medvlp.models.decoder import MaskedTokenDecoder

        self.cfg = m = cfg.method
        self.total_steps = cfg.train.steps
        self.vision, self.text = build_towers(cfg, tokenizer, load_text_weights=load_text_weights)
        v = cfg.model.vision
        self.bridge = Bridge(self.vision.width, m.bridge_depth, v.heads, v.mlp_ratio)
        patch_dim = v.patch_size ** 2 * v.in_chans
        self.image_decoder = MaskedTokenDecoder(self.vision.width, patch_dim, self.vision.grid_size,
                                                width=m.decoder_width, depth=m.decoder_depth, heads=m.decoder_heads)
        self.feature_decoder = MaskedTokenDecoder(self.vision.width, self.vision.width, self.vision.grid_size,
                                                  width=m.feature_decoder_width, depth=m.feature_decoder_depth,
                                                  heads=m.feature_decoder_heads)
        self.build_shared_space(cfg)
        self.loss_fn = ClipLoss(gather_with_grad=m.gather_with_grad, local_loss=m.local_loss)
        # built last, from the initialised student: teacher = student at step 0
        self.teacher = EmaTeacher(self._student_branch(), m.ema_momentum)

    def _student_branch(self) -> ImageBranch:
        # a fresh wrapper each time (no second registration of the student's modules)
        return ImageBranch(self.vision, self.bridge)

    # ------------------------------------------------------------------ encoders
    def clip_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The student's B(E_v(x)) on full images: (B, 1 + N, D), [CLS] first."""
        return self._student_branch()(images)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.clip_tokens(images)[:, 0]), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(input_ids, attention_mask).pooled), dim=-1)

    def patch_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        # the bridge's patch tokens through the CLIP image projection (localisation maps)
        return F.normalize(self.image_proj(self.clip_tokens(images)[:, 1:]), dim=-1)

    def momentum(self, step: int) -> float:
        """Teacher momentum after optimizer step ``step`` (0-based)."""
        if self.cfg.ema_schedule == "constant":
            return self.cfg.ema_momentum
        return cosine_momentum(step, self.total_steps, self.cfg.ema_momentum)

    # ------------------------------------------------------------------ training
    def _clip_loss(self, batch, paired: torch.Tensor) -> torch.Tensor:
        if bool(paired.all()):  # the usual all-paired batch: no copies
            images, ids, attn, texts = batch.images, batch.input_ids, batch.attention_mask, batch.texts
        else:
            idx = paired.nonzero().flatten()
            images, ids, attn = batch.images[idx], batch.input_ids[idx], batch.attention_mask[idx]
            texts = [batch.texts[i] for i in idx.tolist()] if batch.texts else []
        img = self.encode_image(images)
        txt = self.encode_text(ids, attn)
        keys = text_hashes(texts, img.device) if self.cfg.mask_identical_texts and texts else None
        return self.loss_fn(img, txt, self.scale(), pair_keys=keys)

    def _unused_clip_path(self) -> torch.Tensor:
        # A batch without paired samples: CLIP's parameters get an exact zero gradient rather
        # than none, so DDP (which expects every trainable parameter to be used) does not stall.
        params = [p for mod in (self.bridge, self.text, self.image_proj, self.text_proj) for p in mod.parameters()]
        return sum(p.sum() for p in params if p.requires_grad) * 0.0 + self.logit_scale * 0.0

    def forward(self, batch) -> dict[str, torch.Tensor]:
        m, images = self.cfg, batch.images
        paired = batch.has_text
        if paired is None:  # a batch built without flags: paired exactly when it carries text
            paired = torch.full((len(batch),), batch.input_ids is not None, dtype=torch.bool, device=images.device)
        n_paired = int(paired.sum())

        # One masked pass over every image feeds both decoders.
        masked = self.vision(images, mask_ratio=m.mask_ratio)
        pixels = self.image_decoder(masked.tokens, masked.ids_restore)
        loss_mim = masked_patch_mse(pixels, self.vision.patchify(images), masked.mask, norm_pix=m.norm_pix)
        predicted = self.feature_decoder(masked.tokens, masked.ids_restore)
        target = self.teacher(images)[:, 1:]  # no gradient (EmaTeacher.forward)
        loss_mkd = masked_feature_distill(predicted, target, masked.mask, kind=m.mkd_loss, beta=m.mkd_beta)

        loss_clip = self._clip_loss(batch, paired) if n_paired else self._unused_clip_path()
        loss = m.mim_weight * loss_mim + m.clip_weight * loss_clip + m.mkd_weight * loss_mkd
        return {"loss": loss, "loss_mim": loss_mim.detach(), "loss_clip": loss_clip.detach(),
                "loss_mkd": loss_mkd.detach(), "n_paired": torch.tensor(float(n_paired)),
                "logit_scale": self.scale().detach()}

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        self.clamp_logit_scale()
        self.teacher.update(self._student_branch(), self.momentum(step))


__all__ = ["Bridge", "ImageBranch", "MaskedClip", "MaskedClipConfig"]
