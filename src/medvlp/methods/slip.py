"""SLIP: CLIP + SimCLR on two medical-safe views of each image (METHODS.md "Baselines").

L = L_CLIP(original image, report) + ``ssl_weight`` * NT-Xent(h(E_v(view1)), h(E_v(view2)); tau 0.1)

- From SLIP: the image encoder is shared by both objectives; the self-supervised branch has
  its own MLP projection head h; two augmented views per image; tau 0.1; the CLIP term sees the
  un-augmented image (SLIP feeds CLIP a separate view; here the loader's own augmentation, if
  enabled, provides it).
- This project's choices: the views come from :func:`medvlp.models.augment.random_view` (mild
  affine, contrast / gamma / noise, no flip by default because laterality is in the reports);
  h is a 2-layer MLP (SLIP: 3 layers, 4096 wide); NT-Xent is computed per process (SLIP gathers
  across GPUs). One step costs three image-encoder passes (CLIP's one plus two views).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medvlp.errors import ConfigError
from medvlp.losses.selfsup import nt_xent
from medvlp.methods.clip import Clip, ClipConfig
from medvlp.models.augment import ViewConfig, random_view
from medvlp.registry import METHODS


@dataclass
class SlipConfig(ClipConfig):
    name: str = "slip"
    ssl_weight: float = 1.0
    ssl_temperature: float = 0.1
    ssl_hidden: int = 256
    ssl_dim: int = 128
    hflip: bool = False  # laterality matters in reports: off unless the data have none

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.ssl_weight < 0:
            raise ConfigError(f"{prefix}.ssl_weight: must be >= 0, got {self.ssl_weight}")
        if not self.ssl_temperature > 0:
            raise ConfigError(f"{prefix}.ssl_temperature: must be > 0, got {self.ssl_temperature} (SLIP uses 0.1)")
        if self.ssl_hidden < 1 or self.ssl_dim < 1:
            raise ConfigError(f"{prefix}.ssl_hidden / ssl_dim: must be >= 1, got {self.ssl_hidden} / {self.ssl_dim}")


@METHODS.register("slip", SlipConfig, "SLIP: CLIP + SimCLR on two medical-safe image views")
class Slip(Clip):
    def __init__(self, cfg, tokenizer, *, load_text_weights: bool = True):
        super().__init__(cfg, tokenizer, load_text_weights=load_text_weights)
        m: SlipConfig = self.cfg
        # no SimCLR term, no head (and no view passes): SLIP with ssl_weight 0 is CLIP
        self.ssl_head = nn.Sequential(nn.Linear(self.vision.width, m.ssl_hidden), nn.GELU(),
                                      nn.Linear(m.ssl_hidden, m.ssl_dim)) if self.uses_ssl_head() else None
        self.views = ViewConfig(hflip=m.hflip, mean=cfg.data.mean, std=cfg.data.std)

    def uses_ssl_head(self) -> bool:
        """Whether a loss term needs the SimCLR projection head."""
        return self.cfg.ssl_weight > 0

    def forward(self, batch) -> dict[str, torch.Tensor]:
        out = super().forward(batch)
        if self.ssl_head is None:
            return out
        both = torch.cat([random_view(batch.images, self.views), random_view(batch.images, self.views)])
        z1, z2 = self.ssl_head(self.vision(both).pooled).chunk(2)
        ssl = nt_xent(z1, z2, self.cfg.ssl_temperature)
        out["loss"] = out["loss"] + self.cfg.ssl_weight * ssl
        out["loss_ssl"] = ssl.detach()
        return out


__all__ = ["Slip", "SlipConfig"]
