"""MRM: masked radiograph modeling + masked report modeling conditioned on the image.

Image half: exactly MAE's (:mod:`medvlp.methods.mae`): the ViT encodes a random 25 % of the
patches (``mask_ratio`` 0.75), the light :class:`~medvlp.models.decoder.MaskedTokenDecoder`
predicts every patch, and the loss is the normalised-pixel MSE on the masked patches only.

Report half: whole-word BERT masking (``text_mask_prob`` 0.5 of the words, 80/10/10) of the
report; the mean of the visible image patch tokens from the *same* masked encoder pass is
projected to the text embedding width and added to every token's input embedding, so the text
tower must read the image to fill in the report; a prediction head tied to the input
embeddings scores the masked words (:func:`~medvlp.models.heads.masked_lm_loss`). Only
samples with a report (``batch.has_text``) are MLM targets.

    L = mim_weight * L_MIM + mlm_weight * L_MLM

There is no shared image-text space: like MAE, evaluation runs the linear probe on the image
encoder's pooled features and skips zero-shot and retrieval (``supports_text = False``). The
text tower still needs a tokenizer trained on the paired reports (``needs_tokenizer``, read by
:func:`medvlp.train.loop.prepare_tokenizer`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from medvlp.data.masking import IGNORE
from medvlp.errors import ConfigError
from medvlp.losses.reconstruction import masked_patch_mse
from medvlp.methods.mae import Mae, MaeConfig
from medvlp.models.heads import MlmHead, MlmSpec, masked_lm_loss
from medvlp.registry import METHODS


@dataclass
class MrmConfig(MaeConfig):
    name: str = "mrm"
    text_mask_prob: float = 0.5
    mim_weight: float = 1.0
    mlm_weight: float = 1.0

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if not 0.0 < self.text_mask_prob < 1.0:
            raise ConfigError(f"{prefix}.text_mask_prob: must be within (0, 1), got {self.text_mask_prob} "
                              "(MRM masks 0.5 of the report's words)")
        for key in ("mim_weight", "mlm_weight"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0.0):
                raise ConfigError(f"{prefix}.{key}: must be a finite number >= 0, got {value}")
        if self.mim_weight == 0.0 and self.mlm_weight == 0.0:
            raise ConfigError(f"{prefix}.mim_weight / mlm_weight: both are 0, nothing would be trained; "
                              "set at least one to a positive value (MRM uses 1.0 and 1.0)")


@METHODS.register("mrm", MrmConfig, "MRM: MAE + report MLM (mask 0.5) conditioned on the mean visible image token (image-only eval)")
class Mrm(Mae):
    """MAE's image half (``vision``, ``decoder``) plus a text tower, an image-to-text
    conditioning projection and a tied MLM head."""

    #: the text tower needs a tokenizer trained on the paired reports (see train.loop.prepare_tokenizer)
    needs_tokenizer = True

    def __init__(self, cfg, tokenizer, *, load_text_weights: bool = True):
        super().__init__(cfg, tokenizer, load_text_weights=load_text_weights)
        from medvlp.models.text import build_text_encoder

        # build_towers' text half; the vision half is MAE's, already built above
        self.text = build_text_encoder(cfg.model.text, tokenizer, load_weights=load_text_weights)
        self.mlm_spec = MlmSpec.from_tokenizer(tokenizer)
        embeddings = self.text.get_input_embeddings()
        self.image_to_text = nn.Linear(self.vision.width, embeddings.weight.shape[1])
        # The image vector is added to word embeddings initialised at std 0.02 (BERT); start it on
        # that scale (the encoder's tokens are LayerNorm-ed, ~unit per feature) so it does not
        # drown the token identities before the text tower has learned anything.
        nn.init.normal_(self.image_to_text.weight, std=0.02 / math.sqrt(self.vision.width))
        nn.init.zeros_(self.image_to_text.bias)
        self.mlm_head = MlmHead(self.text.width, embeddings)

    # ------------------------------------------------------------------ pieces
    def mask_report(self, batch, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole-word masked ids and labels (B, L); samples without a report get no targets."""
        if batch.input_ids is None or batch.word_ids is None:
            raise ValueError("MRM needs tokenised reports in the batch (input_ids and word_ids); "
                             "batches from medvlp's data loaders carry them")
        masked, labels = self.mlm_spec.mask(batch.input_ids, batch.word_ids, self.cfg.text_mask_prob, generator)
        if batch.has_text is not None:
            labels = labels.masked_fill(~batch.has_text.to(labels.device)[:, None], IGNORE)
        return masked, labels

    def image_condition(self, visible_tokens: torch.Tensor) -> torch.Tensor:
        """(B, K, vision width) visible patch tokens -> (B, text embedding width)."""
        return self.image_to_text(visible_tokens.mean(dim=1))

    def report_hidden(self, masked_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      condition: torch.Tensor) -> torch.Tensor:
        """Text-tower states (B, L, D) of the masked report with ``condition`` (B, E) added to
        every token's input embedding."""
        embeds = self.text.get_input_embeddings()(masked_ids)
        embeds = embeds + condition[:, None, :].to(embeds.dtype)
        return self.text(attention_mask=attention_mask, inputs_embeds=embeds).tokens

    # ------------------------------------------------------------------ training
    def forward(self, batch) -> dict[str, torch.Tensor]:
        m = self.cfg
        out = self.vision(batch.images, mask_ratio=m.mask_ratio)
        pred = self.decoder(out.tokens, out.ids_restore)
        loss_mim = masked_patch_mse(pred, self.vision.patchify(batch.images), out.mask, norm_pix=m.norm_pix)

        masked_ids, labels = self.mask_report(batch)
        condition = self.image_condition(out.tokens)
        attention_mask = batch.attention_mask
        keep = batch.has_text
        if keep is not None and bool(keep.any()) and not bool(keep.all()):
            # only the rows with a report run the text tower; a batch without any report still
            # runs it on every row (all labels ignored) so every parameter keeps a gradient path,
            # which DDP needs (the paired count per batch is the same on every rank)
            keep = keep.to(masked_ids.device)
            masked_ids, labels, condition = masked_ids[keep], labels[keep], condition[keep]
            attention_mask = None if attention_mask is None else attention_mask[keep]
        hidden = self.report_hidden(masked_ids, attention_mask, condition)
        loss_mlm = masked_lm_loss(self.mlm_head, hidden, labels)

        loss = m.mim_weight * loss_mim + m.mlm_weight * loss_mlm
        return {"loss": loss, "loss_mim": loss_mim.detach(), "loss_mlm": loss_mlm.detach()}


__all__ = ["Mrm", "MrmConfig"]
