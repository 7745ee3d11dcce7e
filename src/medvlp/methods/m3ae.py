"""M3AE: masked image + masked language modeling through a co-attention fusion encoder, plus ITM.

One step, all samples paired:

- the ViT encodes a random 25 % of the patches (``mask_ratio`` 0.75); its sequence is [CLS] +
  the visible tokens. The report is corrupted by whole-word MLM masking (``text_mask_prob``
  0.15, BERT's 80/10/10, never special tokens) and encoded by the text tower;
- both sequences are projected (linear) to ``fusion_width`` and fused by
  :class:`~medvlp.models.fusion.FusionEncoder` (co-attention layers);
- L_MIM: the light :class:`~medvlp.models.decoder.MaskedTokenDecoder` reconstructs the pixels
  from the fused visible image tokens ([CLS] dropped), normalised-pixel MSE on masked patches;
- L_MLM: a head tied to the text input embeddings predicts the masked words from the fused
  report tokens;
- L_ITM: the pairs of the main pass are the positives; for each image one report and for each
  report one image are drawn among the true negatives (identical reports are never negatives),
  fused in one extra fusion pass over the already encoded (masked) sequences; the matching head
  reads concat(fused image [CLS], fused report [CLS]).

L = L_MIM + L_MLM + itm_weight * L_ITM. M3AE has no shared embedding space: zero-shot and ITC
retrieval do not apply; the image tasks run on the image encoder, VQA on the fused features and
retrieval on the ITM head (``retrieval_itm``, on a fixed pool of test pairs). :class:`M3ae` is also the base
of MPMA (:mod:`medvlp.methods.mpma`), which adds memory slots, alignment and hard negatives
through the hooks ``_fusion_memory_slots``, ``_wants_attention`` and ``_alignment``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from medvlp.config import MethodConfig
from medvlp.errors import ConfigError
from medvlp.losses.matching import not_negative_mask, sample_hard_negatives
from medvlp.losses.reconstruction import masked_patch_mse
from medvlp.methods.base import Method, build_towers
from medvlp.methods.clip import text_hashes
from medvlp.models.output import EncoderOutput
from medvlp.registry import METHODS


@dataclass
class FusionConfig(MethodConfig):
    """The keys of the co-attention fusion encoder and its MLM / ITM heads (M3AE, MPMA, Uni-Mlip)."""

    text_mask_prob: float = 0.15
    fusion_width: int = 0  # 0: the text encoder's width
    fusion_depth: int = 1  # M3AE: 6 (ViT-B); 1 keeps MPMA within 2x a CLIP step (docs)
    fusion_heads: int = 4
    fusion_mlp_ratio: float = 4.0
    itm_weight: float = 1.0

    def validate(self, prefix: str) -> None:
        if not 0.0 < self.text_mask_prob <= 0.5:
            raise ConfigError(f"{prefix}.text_mask_prob: must be within (0, 0.5], got {self.text_mask_prob} "
                              "(BERT / M3AE use 0.15)")
        if self.fusion_width < 0 or (self.fusion_width and self.fusion_width % self.fusion_heads):
            raise ConfigError(f"{prefix}.fusion_width: must be 0 (= model.text.width) or a positive multiple of "
                              f"fusion_heads ({self.fusion_heads}), got {self.fusion_width}")
        for key in ("fusion_depth", "fusion_heads"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{prefix}.{key}: must be >= 1, got {getattr(self, key)}")
        if self.fusion_mlp_ratio <= 0:
            raise ConfigError(f"{prefix}.fusion_mlp_ratio: must be > 0, got {self.fusion_mlp_ratio}")
        if self.itm_weight < 0:
            raise ConfigError(f"{prefix}.itm_weight: must be >= 0 (0 turns ITM off), got {self.itm_weight}")


@dataclass
class M3aeConfig(FusionConfig):
    name: str = "m3ae"
    mask_ratio: float = 0.75
    decoder_width: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix: bool = True
    # what the ITM term fuses: the masked views of the main pass (no extra encoder pass) or the whole
    # image and the unmasked report, as M3AE's paper does (one more pass of both encoders)
    itm_inputs: Literal["masked", "whole"] = "masked"

    def validate(self, prefix: str) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"{prefix}.mask_ratio: must be within (0, 1), got {self.mask_ratio} (M3AE uses 0.75)")
        FusionConfig.validate(self, prefix)
        for key in ("decoder_depth", "decoder_heads"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{prefix}.{key}: must be >= 1, got {getattr(self, key)}")
        if self.decoder_width % self.decoder_heads:
            raise ConfigError(f"{prefix}.decoder_width ({self.decoder_width}) must be divisible by decoder_heads "
                              f"({self.decoder_heads})")


def itm_pairs(text_for_image: torch.Tensor, image_for_text: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (image, report) pairs of the ITM loss and their targets.

    Args:
        text_for_image: (B,) the negative report drawn for each image, -1 where there is none.
        image_for_text: (B,) the negative image drawn for each report, -1 where there is none.
    Returns ``(image_index, text_index, target)``, each (M,) long: first the B positives (i, i)
    with target 1, then (i, text_for_image[i]) and (image_for_text[k], k) with target 0, rows
    with -1 left out, so M = B + number of valid negatives.
    """
    b = text_for_image.shape[0]
    ar = torch.arange(b, device=text_for_image.device)
    img_rows, txt_cols = text_for_image >= 0, image_for_text >= 0
    image_index = torch.cat([ar, ar[img_rows], image_for_text[txt_cols]])
    text_index = torch.cat([ar, text_for_image[img_rows], ar[txt_cols]])
    target = torch.cat([torch.ones(b, dtype=torch.long, device=ar.device),
                        torch.zeros(image_index.shape[0] - b, dtype=torch.long, device=ar.device)])
    return image_index, text_index, target


@dataclass
class MaskedViews:
    """What one step's unimodal pass produced (shared by all loss terms)."""

    vision: EncoderOutput      # masked ViT output: pooled [CLS], visible tokens, mask, ids_restore
    text: EncoderOutput        # text tower on the MLM-corrupted ids
    mlm_labels: torch.Tensor   # (B, L) original ids at MLM targets, -100 elsewhere
    image_seq: torch.Tensor    # (B, 1 + K, W) [CLS] + visible tokens projected to the fusion width
    text_seq: torch.Tensor     # (B, L, W)
    text_padding: torch.Tensor | None  # (B, L) True at padding


class FusionHeads:
    """Mixin for methods with a co-attention fusion encoder over the image and report token
    sequences (M3AE, MPMA, Uni-Mlip): its input projections, the MLM head tied to the text input
    embeddings, the ITM head, and the ITM loss with negatives drawn from a similarity matrix.
    Needs ``self.vision`` and ``self.text`` built first."""

    def build_fusion(self, m: FusionConfig, tokenizer, *, memory_slots: int = 0, mlm: bool = True) -> int:
        """Build the fusion modules (the MLM head and [MASK] spec only when ``mlm``, the ITM head
        only when ``m.itm_weight > 0``); returns the fusion width."""
        from medvlp.models.fusion import FusionEncoder
        from medvlp.models.heads import ItmHead, MlmHead, MlmSpec

        width = m.fusion_width or self.text.width
        if width % m.fusion_heads:
            raise ConfigError(f"method.fusion_heads: the fusion width {width} (model.text.width when "
                              f"method.fusion_width is 0) is not divisible by {m.fusion_heads}")
        self.mlm_spec = MlmSpec.from_tokenizer(tokenizer) if mlm else None
        self.image_to_fusion = nn.Linear(self.vision.width, width)
        self.text_to_fusion = nn.Linear(self.text.width, width)
        self.fusion = FusionEncoder(width, m.fusion_depth, m.fusion_heads, m.fusion_mlp_ratio, memory_slots=memory_slots)
        self.mlm_head = MlmHead(width, self.text.get_input_embeddings()) if mlm else None
        self.itm_head = ItmHead(2 * width) if m.itm_weight > 0 else None
        return width

    # ------------------------------------------------------------------ evaluation (whole inputs)
    def fusion_image_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, W): the whole image's [CLS] + patch tokens (no masking), projected to the
        fusion width."""
        vis = self.vision(images)
        return self.image_to_fusion(torch.cat([vis.pooled[:, None], vis.tokens], dim=1))

    def fusion_text_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The unmasked report's tokens projected to the fusion width (B, L, W) and its padding
        mask (B, L), True at padding (the text tower's ``padding_mask``; None only when the tower
        gives none)."""
        txt = self.text(input_ids, attention_mask)
        return self.text_to_fusion(txt.tokens), txt.padding_mask

    def fused_pair(self, image_seq: torch.Tensor, text_seq: torch.Tensor,
                   text_padding: torch.Tensor | None) -> torch.Tensor:
        """(B, 2W): the fusion encoder's image and report [CLS] states of B (image, report) pairs,
        concatenated (what the ITM head reads)."""
        fused_img, fused_txt = self.fusion(image_seq, text_seq, text_padding, first_token_only=True)
        return torch.cat([fused_img[:, 0], fused_txt[:, 0]], dim=-1)

    def vqa_features(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, 2W) fused features of (image, question) pairs for the VQA task (:meth:`fused_pair` of
        the whole image and the unmasked question)."""
        return self.fused_pair(self.fusion_image_inputs(images), *self.fusion_text_inputs(input_ids, attention_mask))

    def itm_logits(self, image_seq: torch.Tensor, text_seq: torch.Tensor,
                   text_padding: torch.Tensor | None) -> torch.Tensor:
        """(B,) the ITM head's log-odds that each (image, report) pair matches, from the
        :meth:`fusion_image_inputs` / :meth:`fusion_text_inputs` sequences (retrieval by ITM)."""
        if self.itm_head is None:
            raise ValueError(f"{type(self).__name__} was built without an ITM head (method.itm_weight is 0)")
        logits = self.itm_head(self.fused_pair(image_seq, text_seq, text_padding)).float()
        return logits[:, 1] - logits[:, 0]  # class 1 = match (the positives of itm_pairs)

    def itm_pairs_for(self, batch, sim: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`itm_pairs` for this batch: one negative per image and per report drawn by
        ``softmax(sim)`` (uniform when None) among the true negatives; identical reports are
        never negatives of each other."""
        b, device = len(batch), batch.images.device
        same = not_negative_mask(b, text_hashes(batch.texts, device), device=device)
        if sim is None:  # no similarity to rank by: uniform among the true negatives
            sim = torch.zeros(b, b, device=device)
        return itm_pairs(*sample_hard_negatives(sim.detach(), same))

    def _itm_loss_whole(self, batch, sim: torch.Tensor | None) -> torch.Tensor:
        """ITM on the whole images and unmasked reports (``itm_inputs: whole``): one more pass of both
        encoders, then the positives and the drawn negatives through the fusion ([CLS] rows only)."""
        image_index, text_index, target = self.itm_pairs_for(batch, sim)
        image_seq = self.fusion_image_inputs(batch.images)
        text_seq, padding = self.fusion_text_inputs(batch.input_ids, batch.attention_mask)
        padding = None if padding is None else padding[text_index]
        logits = self.itm_head(self.fused_pair(image_seq[image_index], text_seq[text_index], padding)).float()
        return F.cross_entropy(logits, target)

    def _itm_loss(self, batch, views: MaskedViews, fused_img: torch.Tensor, fused_txt: torch.Tensor,
                  sim: torch.Tensor | None) -> torch.Tensor:
        image_index, text_index, target = self.itm_pairs_for(batch, sim)
        b = len(batch)
        reps = [torch.cat([fused_img[:, 0], fused_txt[:, 0]], dim=-1)]  # the positives: the main pass
        neg_img, neg_txt = image_index[b:], text_index[b:]
        if neg_img.numel():  # the negatives: one more fusion pass ([CLS] rows only), no extra encoder pass
            padding = None if views.text_padding is None else views.text_padding[neg_txt]
            reps.append(self.fused_pair(views.image_seq[neg_img], views.text_seq[neg_txt], padding))
        logits = self.itm_head(torch.cat(reps)).float()
        return F.cross_entropy(logits, target)


@METHODS.register("m3ae", M3aeConfig, "M3AE: masked image + masked language modeling via co-attention fusion, + ITM")
class M3ae(FusionHeads, Method):
    # no shared image-text space: evaluation runs the linear probe only
    supports_text = False
    # it still needs a real tokenizer trained on the reports (MLM predicts its words)
    needs_tokenizer = True
    no_weight_decay = (*Method.no_weight_decay, "mask_token", "fusion.memory")

    def __init__(self, cfg, tokenizer, *, load_text_weights: bool = True):
        super().__init__()
        from medvlp.models.decoder import MaskedTokenDecoder

        self.cfg = m = cfg.method
        self.vision, self.text = build_towers(cfg, tokenizer, load_text_weights=load_text_weights)
        width = self.build_fusion(m, tokenizer, memory_slots=self._fusion_memory_slots())
        patch_dim = cfg.model.vision.patch_size ** 2 * cfg.model.vision.in_chans
        self.decoder = MaskedTokenDecoder(width, patch_dim, self.vision.grid_size,
                                          width=m.decoder_width, depth=m.decoder_depth, heads=m.decoder_heads)

    # ------------------------------------------------------------------ hooks (MPMA overrides)
    def _fusion_memory_slots(self) -> int:
        return 0

    def _wants_attention(self) -> bool:
        """Whether the unimodal passes return their last-layer [CLS] attention."""
        return False

    def _alignment(self, batch, views: MaskedViews):
        """Extra weighted loss terms, logged metrics, and the (B, B) image x report similarity
        the ITM negatives are drawn from (None: uniform among the true negatives)."""
        return {}, {}, None

    # ------------------------------------------------------------------ encoders
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        # only so generic image-embedding code runs; there is no shared text space
        return F.normalize(self.image_features(images), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no shared image-text space "
                                  "(zero-shot and retrieval do not apply)")

    def masked_views(self, batch) -> MaskedViews:
        """Masked image and MLM-corrupted report through their encoders and fusion projections."""
        name = type(self).__name__
        if batch.has_text is not None and not bool(batch.has_text.all()):
            raise ValueError(f"{name} needs a report for every sample (paired masking); filter image-only "
                             "samples (data.sources of kind 'paired' only) or use a semi-supervised method")
        if batch.input_ids is None or len(batch.texts) != len(batch):
            raise ValueError(f"{name} needs the batch's token ids and report texts (the collator provides them)")
        m, attention = self.cfg, self._wants_attention()
        vis = self.vision(batch.images, mask_ratio=m.mask_ratio, return_attention=attention)
        ids, labels = self.mlm_spec.mask(batch.input_ids, batch.word_ids, m.text_mask_prob)
        txt = self.text(ids, batch.attention_mask, return_attention=attention)
        image_seq = self.image_to_fusion(torch.cat([vis.pooled[:, None], vis.tokens], dim=1))
        return MaskedViews(vis, txt, labels, image_seq, self.text_to_fusion(txt.tokens), txt.padding_mask)

    # ------------------------------------------------------------------ training
    def forward(self, batch) -> dict[str, torch.Tensor]:
        from medvlp.models.heads import masked_lm_loss

        views = self.masked_views(batch)
        fused_img, fused_txt = self.fusion(views.image_seq, views.text_seq, views.text_padding)
        pred = self.decoder(fused_img[:, 1:], views.vision.ids_restore)  # [CLS] is not a patch
        terms = {
            "mim": (1.0, masked_patch_mse(pred, self.vision.patchify(batch.images), views.vision.mask,
                                          norm_pix=self.cfg.norm_pix)),
            "mlm": (1.0, masked_lm_loss(self.mlm_head, fused_txt, views.mlm_labels)),
        }
        extra_terms, metrics, sim = self._alignment(batch, views)
        terms.update(extra_terms)
        if self.itm_head is not None and self.cfg.itm_inputs == "whole":
            terms["itm"] = (self.cfg.itm_weight, self._itm_loss_whole(batch, sim))
        elif self.itm_head is not None:
            terms["itm"] = (self.cfg.itm_weight, self._itm_loss(batch, views, fused_img, fused_txt, sim))
        loss = sum(weight * term for weight, term in terms.values())
        return {"loss": loss, **{f"loss_{k}": term.detach() for k, (_, term) in terms.items()}, **metrics}


__all__ = ["FusionConfig", "FusionHeads", "M3ae", "M3aeConfig", "MaskedViews", "itm_pairs"]
