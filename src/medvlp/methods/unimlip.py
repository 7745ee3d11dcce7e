"""Uni-Mlip: unified self-supervision (METHODS.md section 4) = SLIP + feature-level ITC + SimCSE + fusion.

One step, all samples paired, five terms besides the data-level ITC:

- cross-modality, data level: CLIP's symmetric InfoNCE (learned logit scale, identical reports
  not negatives) between the *augmented* view 1 of each image and its report;
- cross-modality, feature level (``feat_weight``): the same loss on the same pooled features
  perturbed by Gaussian noise (:func:`medvlp.models.augment.feature_noise`, ``feat_noise_std``
  times each row's feature std) before the projections; no extra encoder pass;
- image uni-modality (``ssl_weight``, SLIP's key and head): NT-Xent between two medical-safe
  views (:func:`medvlp.models.augment.random_view`); view 1 is the one the ITC sees, so SLIP's
  third image pass is saved;
- text uni-modality (``txt_ssl_weight``): SimCSE, NT-Xent between two dropout passes of the text
  encoder on the same report (pooled features, ``txt_ssl_temperature``, identical reports not
  negatives). When the text tower has no dropout (``model.text.dropout: 0``) the second pass
  would be identical, so dropout ``txt_feat_dropout`` is applied to the pooled features instead;
- fused modality: the co-attention fusion encoder of M3AE (:class:`~medvlp.methods.m3ae.FusionHeads`)
  over view 1's [CLS] + patch tokens and the MLM-corrupted report: image-conditioned MLM
  (``mlm_weight``, head tied to the text input embeddings) and ITM (``itm_weight``) with one hard
  negative per image and per report drawn from the detached ITC similarity (ALBEF-style).

L = L_ITC + feat_weight L_ITC~ + ssl_weight L_NT-Xent + txt_ssl_weight L_SimCSE + itm_weight L_ITM
+ mlm_weight L_MLM; a weight of 0 skips that branch's compute (and its parameters are not built).
Cost: two image passes (2B rows), one text pass over up to 3B rows (report, its dropout twin,
the masked report), one depth-1 fusion pass plus a [CLS]-only one for the ITM negatives.
Evaluation: a dual encoder like CLIP (``encode_image`` / ``encode_text`` / ``patch_embeddings``
inherited); the fusion encoder is a pre-training device only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medvlp.errors import ConfigError
from medvlp.losses.selfsup import nt_xent
from medvlp.methods.clip import text_hashes
from medvlp.methods.m3ae import FusionConfig, FusionHeads, MaskedViews
from medvlp.methods.slip import Slip, SlipConfig
from medvlp.models.augment import feature_noise, random_view
from medvlp.registry import METHODS


@dataclass
class UniMlipConfig(SlipConfig, FusionConfig):
    name: str = "unimlip"
    feat_weight: float = 1.0           # feature-level ITC on noise-perturbed pooled features
    feat_noise_std: float = 0.1        # noise std, relative to each feature row's std
    txt_ssl_weight: float = 0.5        # SimCSE on the reports
    txt_ssl_temperature: float = 0.05  # SimCSE's temperature
    txt_feat_dropout: float = 0.1      # pooled-feature dropout for SimCSE when model.text.dropout is 0
    mlm_weight: float = 1.0            # image-conditioned MLM through the fusion encoder

    def validate(self, prefix: str) -> None:
        SlipConfig.validate(self, prefix)
        FusionConfig.validate(self, prefix)
        for key in ("feat_weight", "txt_ssl_weight", "mlm_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{prefix}.{key}: must be >= 0 (0 turns the branch off), got {getattr(self, key)}")
        if not self.feat_noise_std > 0:
            raise ConfigError(f"{prefix}.feat_noise_std: must be > 0 (set feat_weight: 0 to turn the "
                              f"feature-level ITC off), got {self.feat_noise_std}")
        if not self.txt_ssl_temperature > 0:
            raise ConfigError(f"{prefix}.txt_ssl_temperature: must be > 0 (SimCSE uses 0.05), got {self.txt_ssl_temperature}")
        if not 0.0 <= self.txt_feat_dropout < 1.0:
            raise ConfigError(f"{prefix}.txt_feat_dropout: must be within [0, 1), got {self.txt_feat_dropout}")


@METHODS.register("unimlip", UniMlipConfig,
                  "Uni-Mlip: cross-, uni- and fused-modality self-supervision at data and feature level")
class UniMlip(FusionHeads, Slip):
    # MLM predicts the words of the project's tokenizer
    needs_tokenizer = True

    def __init__(self, cfg, tokenizer, *, load_text_weights: bool = True):
        super().__init__(cfg, tokenizer, load_text_weights=load_text_weights)
        m: UniMlipConfig = self.cfg
        if m.ssl_weight == 0:
            self.ssl_head = None  # no image self-supervision: no head left without gradients
        self.fusion = self.mlm_head = self.itm_head = None
        if m.itm_weight > 0 or m.mlm_weight > 0:
            self.build_fusion(m, tokenizer, mlm=m.mlm_weight > 0)
        else:  # no fusion encoder: VQA falls back to dual (image + question) features
            self.vqa_features = None
        if m.txt_ssl_weight > 0 and cfg.model.text.name == "bert" and cfg.model.text.dropout == 0 \
                and m.txt_feat_dropout == 0:
            raise ConfigError("method.txt_feat_dropout: model.text.dropout is 0, so SimCSE's two views need "
                              "txt_feat_dropout > 0 (e.g. 0.1), or set method.txt_ssl_weight: 0")
        # two real dropout passes when the tower has dropout (HF models carry their own)
        self.text_dropout_passes = cfg.model.text.name == "hf" or cfg.model.text.dropout > 0

    def forward(self, batch) -> dict[str, torch.Tensor]:
        m, b = self.cfg, len(batch)
        if batch.has_text is not None and not bool(batch.has_text.all()):
            raise ValueError("UniMlip needs a report for every sample; filter image-only samples "
                             "(data.sources of kind 'paired' only) or use a semi-supervised method")
        n_views = 2 if m.ssl_weight > 0 else 1
        vis = self.vision(torch.cat([random_view(batch.images, self.views) for _ in range(n_views)]))

        # one text pass: the report, its dropout twin (SimCSE) and its MLM-corrupted copy, as needed
        ids, att = [batch.input_ids], [batch.attention_mask]
        twin = m.txt_ssl_weight > 0 and self.text_dropout_passes
        if twin:
            ids.append(batch.input_ids)
            att.append(batch.attention_mask)
        mlm_labels = None
        if self.mlm_head is not None:
            masked_ids, mlm_labels = self.mlm_spec.mask(batch.input_ids, batch.word_ids, m.text_mask_prob)
            ids.append(masked_ids)
            att.append(batch.attention_mask)
        txt = self.text(torch.cat(ids), torch.cat(att))
        pooled_v, pooled_t = vis.pooled[:b], txt.pooled[:b]

        keys = text_hashes(batch.texts, pooled_v.device) if m.mask_identical_texts else None
        scale = self.scale()
        img_e = F.normalize(self.image_proj(pooled_v), dim=-1)
        txt_e = F.normalize(self.text_proj(pooled_t), dim=-1)
        terms = {"clip": (1.0, self.loss_fn(img_e, txt_e, scale, pair_keys=keys))}
        if m.feat_weight > 0:
            noisy_v = F.normalize(self.image_proj(feature_noise(pooled_v, m.feat_noise_std)), dim=-1)
            noisy_t = F.normalize(self.text_proj(feature_noise(pooled_t, m.feat_noise_std)), dim=-1)
            terms["feat"] = (m.feat_weight, self.loss_fn(noisy_v, noisy_t, scale, pair_keys=keys))
        if m.ssl_weight > 0:
            z1, z2 = self.ssl_head(vis.pooled).chunk(2)
            terms["ssl"] = (m.ssl_weight, nt_xent(z1, z2, m.ssl_temperature))
        if m.txt_ssl_weight > 0:
            if twin:
                t1, t2 = pooled_t, txt.pooled[b:2 * b]
            else:  # a dropout-free tower: SimCSE's two views come from dropout on the pooled features
                t1, t2 = (F.dropout(pooled_t, m.txt_feat_dropout, training=True) for _ in range(2))
            terms["txt_ssl"] = (m.txt_ssl_weight, nt_xent(t1, t2, m.txt_ssl_temperature, pair_keys=keys))
        if self.fusion is not None:
            terms.update(self._fused_terms(batch, vis, txt, img_e, txt_e, scale, mlm_labels))
        loss = sum(weight * term for weight, term in terms.values())
        return {"loss": loss, **{f"loss_{k}": term.detach() for k, (_, term) in terms.items()},
                "logit_scale": scale.detach()}

    def _fused_terms(self, batch, vis, txt, img_e, txt_e, scale, mlm_labels) -> dict:
        """MLM and ITM through the fusion encoder over view 1's tokens and the (masked) report."""
        from medvlp.models.heads import masked_lm_loss
        from medvlp.models.output import EncoderOutput

        m, b = self.cfg, len(batch)
        rows = slice(txt.pooled.shape[0] - b, None)  # the masked copy is last; without MLM, the only rows
        text_out = EncoderOutput(txt.pooled[rows], txt.tokens[rows],
                                 None if txt.padding_mask is None else txt.padding_mask[rows])
        image_out = EncoderOutput(vis.pooled[:b], vis.tokens[:b])
        image_seq = self.image_to_fusion(torch.cat([image_out.pooled[:, None], image_out.tokens], dim=1))
        views = MaskedViews(image_out, text_out, mlm_labels, image_seq, self.text_to_fusion(text_out.tokens),
                            text_out.padding_mask)
        fused_img, fused_txt = self.fusion(views.image_seq, views.text_seq, views.text_padding)
        terms = {}
        if mlm_labels is not None:
            terms["mlm"] = (m.mlm_weight, masked_lm_loss(self.mlm_head, fused_txt, mlm_labels))
        if self.itm_head is not None:
            sim = (img_e.float() @ txt_e.float().t() * scale).detach()  # ALBEF: hard negatives by similarity
            terms["itm"] = (m.itm_weight, self._itm_loss(batch, views, fused_img, fused_txt, sim))
        return terms


__all__ = ["UniMlip", "UniMlipConfig"]
