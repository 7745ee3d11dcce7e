"""MAE / MRM's image half: masked image modeling with a light decoder (image only).

The ViT encodes a random 25 % of the patches (``mask_ratio`` 0.75, noise-argsort masking with
restore ids); a light transformer decoder gets the encoded visible tokens (projected to its
width) plus a shared learnable mask token at every hidden position, in the original patch
order, with fixed 2-D sin-cos position embeddings, and predicts every patch's pixels; the loss
is the normalised-pixel MSE on the masked patches only (:mod:`medvlp.losses.reconstruction`).

From the MAE paper: the asymmetric encoder/decoder, mask ratio, mask token, per-patch
normalised targets, loss on masked patches only. This project's choices: the decoder sees no
[CLS] token; decoder width/depth default to 128 / 2 (MAE: 512 / 8) for CPU-sized models.
There is no text tower: evaluation runs the linear probe on the encoder's pooled features and
skips zero-shot and retrieval. MRM (:mod:`medvlp.methods.mrm`) adds the report half.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from medvlp.config import MethodConfig
from medvlp.errors import ConfigError
from medvlp.losses.reconstruction import masked_patch_mse
from medvlp.methods.base import ImageOnlyMethod, Method
from medvlp.registry import METHODS


@dataclass
class MaeConfig(MethodConfig):
    name: str = "mae"
    mask_ratio: float = 0.75
    decoder_width: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix: bool = True

    def validate(self, prefix: str) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"{prefix}.mask_ratio: must be within (0, 1), got {self.mask_ratio} (MAE uses 0.75)")
        if self.decoder_width % self.decoder_heads or self.decoder_depth < 1:
            raise ConfigError(f"{prefix}.decoder_width ({self.decoder_width}) must be divisible by decoder_heads "
                              f"({self.decoder_heads}) and decoder_depth >= 1")


@METHODS.register("mae", MaeConfig, "MAE: masked image modeling, normalised-pixel MSE on masked patches (image only)")
class Mae(ImageOnlyMethod):

    def __init__(self, cfg, tokenizer=None, *, load_text_weights: bool = True):
        super().__init__()
        from medvlp.models.decoder import MaskedTokenDecoder
        from medvlp.models.vit import VisionTransformer

        self.cfg = m = cfg.method
        self.vision = VisionTransformer(cfg.model.vision)
        patch_dim = cfg.model.vision.patch_size ** 2 * cfg.model.vision.in_chans
        self.decoder = MaskedTokenDecoder(self.vision.width, patch_dim, self.vision.grid_size,
                                          width=m.decoder_width, depth=m.decoder_depth, heads=m.decoder_heads)

    no_weight_decay = (*Method.no_weight_decay, "mask_token")

    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted patches (B, N, P), mask (B, N), 1 = hidden) for a fresh random mask."""
        out = self.vision(images, mask_ratio=self.cfg.mask_ratio)
        return self.decoder(out.tokens, out.ids_restore), out.mask

    def forward(self, batch) -> dict[str, torch.Tensor]:
        pred, mask = self.reconstruct(batch.images)
        loss = masked_patch_mse(pred, self.vision.patchify(batch.images), mask, norm_pix=self.cfg.norm_pix)
        return {"loss": loss, "loss_mim": loss.detach()}


__all__ = ["Mae", "MaeConfig"]
