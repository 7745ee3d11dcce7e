"""GLoRIA baseline (METHODS.md "Baselines"), and :class:`GlobalLocal`, the global + local
alignment recipe that GLoRIA and MGCA (:mod:`medvlp.methods.mgca`) share.

:class:`GlobalLocal` is CLIP (towers, projections, learned logit scale, all-gathered
symmetric InfoNCE with identical reports not negatives) plus a token-patch term between the
report's word tokens and the image's patch tokens, both through the *global* projections, so
patch embeddings live in the space the zero-shot prompts live in (what the localisation task
reads through :meth:`~medvlp.methods.clip.Clip.patch_embeddings`). Subclasses say which local
loss, whether the encoders must return their [CLS] attention, and any extra terms.

GLoRIA's local term is :func:`~medvlp.losses.local.gloria_local_loss`: every word of report k
attends to the patches of image i (softmax of ``local_sharpen`` x cosine), the word-context
cosines are aggregated with log-sum-exp (``local_agg``) into one score per (image, report)
pair, and an InfoNCE over the pairs of the rank's batch (``local_scale``) is taken both ways.

L = global_weight * L_global + local_weight * L_local (+ a subclass's extra terms).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medvlp.errors import ConfigError
from medvlp.losses.local import gloria_local_loss
from medvlp.methods.clip import Clip, ClipConfig, text_hashes
from medvlp.registry import METHODS


@dataclass
class GlobalLocalConfig(ClipConfig):
    global_weight: float = 1.0
    local_weight: float = 1.0

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.global_weight <= 0:
            raise ConfigError(f"{prefix}.global_weight: must be > 0 (zero-shot and retrieval use the global space), "
                              f"got {self.global_weight}")
        if self.local_weight < 0:
            raise ConfigError(f"{prefix}.local_weight: must be >= 0 (0 turns local alignment off), got {self.local_weight}")


@dataclass
class GloriaConfig(GlobalLocalConfig):
    name: str = "gloria"
    local_sharpen: float = 4.0  # word -> patch attention temperature (GLoRIA's gamma_1)
    local_agg: float = 5.0      # log-sum-exp aggregation of word scores (gamma_2)
    local_scale: float = 10.0   # InfoNCE scale over pair scores (gamma_3)

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        for key in ("local_sharpen", "local_agg", "local_scale"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{prefix}.{key}: must be > 0, got {getattr(self, key)}")


def report_words(batch, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The report's word tokens: (B, L', D) token states and (B, L') mask of real words
    (``word_ids >= 0``: no [CLS], [SEP] or padding), cut after the last column holding a word
    so the local losses do not pay for padding."""
    mask = batch.word_ids >= 0
    cols = mask.any(dim=0).nonzero()
    length = int(cols.max()) + 1 if cols.numel() else 1
    return tokens[:, :length], mask[:, :length]


class GlobalLocal(Clip):
    """CLIP + a token-patch local term; subclasses implement :meth:`_local_loss`."""

    def _wants_attention(self) -> bool:
        return False

    def _local_loss(self, batch, vision, text) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def _extra_terms(self, img: torch.Tensor, txt: torch.Tensor) -> dict[str, tuple[float, torch.Tensor]]:
        """name -> (weight, loss) beyond global and local, from the normalised global embeddings."""
        return {}

    def forward(self, batch) -> dict[str, torch.Tensor]:
        if not bool(batch.has_text.all()):
            raise ValueError(f"{self.cfg.name} needs a report for every sample; use kind 'paired' data.sources only")
        m = self.cfg
        attention = self._wants_attention()
        vision = self.vision(batch.images, return_attention=attention)
        text = self.text(batch.input_ids, batch.attention_mask, return_attention=attention)
        img = F.normalize(self.image_proj(vision.pooled), dim=-1)
        txt = F.normalize(self.text_proj(text.pooled), dim=-1)
        scale = self.scale()
        keys = text_hashes(batch.texts, img.device) if m.mask_identical_texts else None
        terms = {"global": (m.global_weight, self.loss_fn(img, txt, scale, pair_keys=keys))}
        if m.local_weight > 0:
            terms["local"] = (m.local_weight, self._local_loss(batch, vision, text))
        terms.update(self._extra_terms(img, txt))
        loss = sum(w * v for w, v in terms.values())
        return {"loss": loss, **{f"loss_{k}": v.detach() for k, (_, v) in terms.items()}, "logit_scale": scale.detach()}


@METHODS.register("gloria", GloriaConfig, "GLoRIA: global InfoNCE + attention-based word-region alignment across the batch")
class Gloria(GlobalLocal):
    def _local_loss(self, batch, vision, text) -> torch.Tensor:
        tokens, word_mask = report_words(batch, text.tokens)
        m = self.cfg
        # the loss is over the rank's own pairs (an (I, T, L, N) attention is too large to gather)
        return gloria_local_loss(self.text_proj(tokens), word_mask, self.image_proj(vision.tokens),
                                 sharpen=m.local_sharpen, agg=m.local_agg, scale=m.local_scale)


__all__ = ["GlobalLocal", "GlobalLocalConfig", "Gloria", "GloriaConfig", "report_words"]
