"""UMCL: unified image-text-label contrastive learning with continuous prompts (METHODS.md section 2).

One stream, one loss. Every image of the batch is a row; the columns are texts of two kinds:

- **report texts**, one per sample with a report (paired sources), encoded as in CLIP;
- **prompt texts**, built by the prompt learner (:class:`~medvlp.models.prompts.PromptLearner`,
  CoOp-style learnable context + class-name tokens from the live embedding table) from a
  sample's *positive classes* ("No Finding" when it has labels but no positive or uncertain
  class). A multi-label set {k1, k2, ...} becomes one text embedding: the mean of the
  (L2-normalised) class-prompt embeddings of its classes, re-normalised -- so only the K class
  prompts go through the text encoder, once per step, however many samples share them. Every
  distinct positive set among the labelled samples of the (gathered) batch is one column
  (``prompt_texts: all``; ``labeled_only``: only image-label samples contribute).

Labels: image-label samples (``data.sources`` kind ``labeled``) carry the manifest's; reports
carry the manifest's or the rule-based labeler's (``data.paired_labels: labeler``).

Loss (:func:`~medvlp.losses.soft_contrastive.label_contrastive_loss`, UniCL multi-positive
``targets: equal`` or MedCLIP-style ``soft``): image i's positives are its own text (its report,
or for an image-label sample the prompt of its label set) and every column whose label vector
equals y_i; samples without labels fall back to the one-hot CLIP target; identical report
texts leave the denominator; symmetric (image->text and text->image).

Zero-shot with learned prompts: class k's positive prompt is [ctx] <class k>; its negative
prompt is [ctx] <negation> <class k> ("no pleural effusion": the negation word as reports
phrase absence), with the same shared context (class-specific contexts: one per prompt).
``negative_weight`` > 0 trains that pair directly: on labelled samples, per known label,
BCE on ``scale * (v . pos_k - v . neg_k)`` -- exactly the zero-shot score.
:meth:`Umcl.class_text_embeddings` gives evaluation the (pos, neg) pairs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from medvlp.data.sample import MISSING, NEGATIVE, POSITIVE, UNCERTAIN
from medvlp.distributed import gather_features
from medvlp.errors import ConfigError, DataError
from medvlp.losses.soft_contrastive import label_contrastive_loss
from medvlp.methods.base import Method, build_towers, dataset_classes
from medvlp.methods.clip import SharedSpace, SharedSpaceConfig, text_hashes
from medvlp.models.prompts import PromptLearner
from medvlp.registry import METHODS

NO_FINDING = "No Finding"


@dataclass
class UmclConfig(SharedSpaceConfig):
    name: str = "umcl"
    # the prompt learner's classes, in the order of the batches' label columns (dataset.json);
    # empty = take the training dataset's; loading a checkpoint fills it from the checkpoint
    classes: list[str] = field(default_factory=list)
    n_ctx: int = 8
    prompt_init: str = "random"
    class_specific: bool = False
    negation: str = "no"
    prompt_texts: Literal["all", "labeled_only"] = "all"
    targets: Literal["equal", "soft"] = "equal"
    tau_t: float = 0.1
    negative_weight: float = 0.5

    def validate(self, prefix: str) -> None:
        if self.n_ctx < 1:
            raise ConfigError(f"{prefix}.n_ctx: must be >= 1 (CoOp uses 4-16), got {self.n_ctx}")
        if not self.prompt_init.strip():
            raise ConfigError(f"{prefix}.prompt_init: 'random' or a phrase such as 'a chest x-ray showing', got an empty string")
        if not self.negation.strip():
            raise ConfigError(f"{prefix}.negation: the word that negates a class in the negative prompt (e.g. 'no'), got ''")
        if self.tau_t <= 0:
            raise ConfigError(f"{prefix}.tau_t: must be > 0 (soft-target temperature), got {self.tau_t}")
        if self.negative_weight < 0:
            raise ConfigError(f"{prefix}.negative_weight: must be >= 0 (0 turns the prompt-pair term off), "
                              f"got {self.negative_weight}")
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"{prefix}.classes: lists a class twice: {self.classes}")
        super().validate(prefix)


def resolve_prompt_classes(cfg) -> list[str]:
    """``method.classes`` or the training dataset's classes (dataset.json)."""
    return dataset_classes(cfg, "UMCL's prompt learner")


def canonical_codes(codes: torch.Tensor, no_finding: int | None) -> torch.Tensor:
    """Label codes (B, K) with "No Finding" made POSITIVE on labelled rows that have no
    POSITIVE and no UNCERTAIN class (the labeler's rule), so such rows get a prompt."""
    if no_finding is None:
        return codes
    labelled = (codes != MISSING).any(1)
    found = ((codes == POSITIVE) | (codes == UNCERTAIN)).any(1)
    fill = labelled & ~found
    out = codes.clone()
    out[fill, no_finding] = POSITIVE
    return out


@METHODS.register("umcl", UmclConfig, "UMCL: image-text-label contrastive learning with learned (CoOp) prompts")
class Umcl(SharedSpace, Method):
    no_weight_decay = Method.no_weight_decay + ("prompt_learner.ctx",)

    def __init__(self, cfg, tokenizer, *, load_text_weights: bool = True):
        super().__init__()
        m: UmclConfig = cfg.method
        self.cfg = m
        self.classes = resolve_prompt_classes(cfg)
        self.vision, self.text = build_towers(cfg, tokenizer, load_text_weights=load_text_weights)
        self.build_shared_space(cfg)
        names = self.classes + [f"{m.negation} {c}" for c in self.classes]  # rows K.. are the negative prompts
        self.prompt_learner = PromptLearner(tokenizer, names, self.text.get_input_embeddings(), n_ctx=m.n_ctx,
                                            class_specific=m.class_specific, init=m.prompt_init)
        self.no_finding = self.classes.index(NO_FINDING) if NO_FINDING in self.classes else None

    # ------------------------------------------------------------------ encoders
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image_features(images)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(input_ids, attention_mask).pooled), dim=-1)

    def patch_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        # as CLIP: the global image projection on every patch token (localisation maps)
        return F.normalize(self.image_proj(self.vision(images).tokens), dim=-1)

    def prompt_embeddings(self, negatives: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Learned class prompts in the shared space: (pos (K, D), neg (K, D) or None), L2-normalised.
        One text-encoder call over K (or 2K) short prompts."""
        embeds, mask = self.prompt_learner(self.text.get_input_embeddings())
        k = len(self.classes)
        if not negatives:
            embeds, mask = embeds[:k], mask[:k]
        out = F.normalize(self.text_proj(self.text(inputs_embeds=embeds, attention_mask=mask).pooled), dim=-1)
        return out[:k], (out[k:] if negatives else None)

    @property
    def learned_prompt_classes(self) -> list[str]:
        return list(self.classes)

    def class_text_embeddings(self, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation hook: learned (pos (K', D), neg (K', D)) prompt embeddings of ``classes``
        (each one of :attr:`learned_prompt_classes`); follows the caller's grad mode."""
        unknown = [c for c in classes if c not in self.classes]
        if unknown:
            raise ValueError(f"UMCL has no learned prompts for {unknown}; it was trained on {self.classes}")
        pos, neg = self.prompt_embeddings(negatives=True)
        index = torch.tensor([self.classes.index(c) for c in classes], device=pos.device)
        return pos[index], neg[index]

    # ------------------------------------------------------------------ training
    def _report_features(self, batch, dim: int, like: torch.Tensor) -> torch.Tensor:
        """(B, D) report embeddings, zero rows where a sample has no report (only reports are encoded)."""
        rows = batch.has_text.nonzero().squeeze(1)
        out = like.new_zeros(len(batch), dim)
        if rows.numel():
            ids, att = batch.input_ids[rows], batch.attention_mask[rows]
            width = int(att.sum(1).max())  # drop the padding only image-label samples needed
            out = out.index_copy(0, rows, self.encode_text(ids[:, :width], att[:, :width]).to(out.dtype))
        return out

    def forward(self, batch) -> dict[str, torch.Tensor]:
        m, k = self.cfg, len(self.classes)
        if batch.labels is None or batch.labels.shape[1] != k:
            got = None if batch.labels is None else tuple(batch.labels.shape)
            raise DataError(f"umcl: batch labels {got} do not match the {k} prompt classes ({', '.join(self.classes)}); "
                            "train on the dataset the prompts were built for (method.classes in dataset.json order)")
        img = self.encode_image(batch.images)
        txt = self._report_features(batch, img.shape[1], img)
        pos, neg = self.prompt_embeddings(negatives=m.negative_weight > 0)
        scale = self.scale()
        codes = canonical_codes(batch.labels, self.no_finding)
        has_text = batch.has_text.to(codes.device)

        # gather rows across ranks (fixed B per rank); the prompt columns are rebuilt from the
        # gathered label sets against the local (identical on every rank) class prompts
        g = m.gather_with_grad
        img_all, txt_all = gather_features(img, gather_with_grad=g), gather_features(txt, gather_with_grad=g)
        codes_all = gather_features(codes, gather_with_grad=False)
        text_all = gather_features(has_text.long(), gather_with_grad=False).bool()
        loss_c, n_prompts = self._unified_loss(img_all, txt_all, codes_all, text_all, pos, scale, batch)
        out = {"loss_contrastive": loss_c.detach(), "logit_scale": scale.detach(),
               "prompt_texts": torch.tensor(float(n_prompts))}
        loss = loss_c
        if m.negative_weight > 0:
            loss_n = self._prompt_pair_loss(img, codes, pos, neg, scale.detach())
            loss = loss + m.negative_weight * loss_n
            out["loss_negative"] = loss_n.detach()
        out["loss"] = loss
        return out

    def _unified_loss(self, img, txt, codes, has_text, pos, scale, batch) -> tuple[torch.Tensor, int]:
        n = img.shape[0]
        member = codes == POSITIVE  # (N, K) positive sets
        eligible = member.any(1)
        labeled_only = eligible & ~has_text
        source = eligible if self.cfg.prompt_texts == "all" else labeled_only
        report_rows = has_text.nonzero().squeeze(1)
        prompt_rows = source.nonzero().squeeze(1)
        sets, inverse = torch.unique(member[prompt_rows].long(), dim=0, return_inverse=True)  # (U, K)
        prompt_emb = F.normalize(sets.to(pos.dtype) @ pos, dim=-1)  # mean of the class prompts' directions
        columns = torch.cat([txt[report_rows], prompt_emb.to(txt.dtype)])
        col_codes = torch.cat([codes[report_rows], torch.where(sets.bool(), POSITIVE, NEGATIVE)])
        t = report_rows.numel()
        pair = torch.full((n,), -1, dtype=torch.long, device=img.device)
        pair[report_rows] = torch.arange(t, device=img.device)
        col_of_row = torch.full((n,), -1, dtype=torch.long, device=img.device)
        col_of_row[prompt_rows] = t + inverse
        pair = torch.where(labeled_only, col_of_row, pair)
        same = None
        if self.cfg.mask_identical_texts and t:
            keys = gather_features(text_hashes(batch.texts, img.device), gather_with_grad=False)
            same = torch.zeros(n, columns.shape[0], dtype=torch.bool, device=img.device)
            same[:, :t] = (keys[:, None] == keys[report_rows][None, :]) & has_text[:, None]
        loss = label_contrastive_loss(img, columns, scale, codes, col_codes, pair, mode=self.cfg.targets,
                                      tau_t=self.cfg.tau_t, same=same)
        return loss, int(sets.shape[0])

    @staticmethod
    def _prompt_pair_loss(img, codes, pos, neg, scale) -> torch.Tensor:
        """Mean BCE over known (POSITIVE / NEGATIVE) labels of ``scale * (v . pos_k - v . neg_k)``."""
        valid = (codes == POSITIVE) | (codes == NEGATIVE)
        margin = scale * (img.float() @ (pos - neg).float().t())
        per = F.binary_cross_entropy_with_logits(margin, (codes == POSITIVE).float(), reduction="none")
        return (per * valid).sum() / valid.sum().clamp(min=1)

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        self.clamp_logit_scale()


__all__ = ["Umcl", "UmclConfig", "canonical_codes", "resolve_prompt_classes"]
