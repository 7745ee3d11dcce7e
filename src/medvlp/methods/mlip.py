"""MLIP: divergence encoder + knowledge-guided contrastive learning (METHODS.md section 3).

CLIP's towers, projections and learned logit scale, plus three levels:

- global, with a divergence encoder: an EMA teacher copy of (E_v, E_t, g_v, g_t) sees another
  view of each pair (a random half of the image's patches dropped, 10 % of the report's word
  tokens dropped from attention), with no gradient. Its embeddings v', w' are second positives
  in a multi-positive InfoNCE (v_i against w_i and w'_i, w_i against v_i and v'_i), and
  KL(q || p) with p_i = softmax_k(s_ik) online, q_i = softmax_k(scale v'_i . w'_k) from the
  teacher, is added with weight ``kl_weight`` (:mod:`medvlp.losses.knowledge`);
- local, token-knowledge-patch: report tokens inside a mention of a knowledge-base entity
  (names and synonyms of :func:`medvlp.data.knowledge.load_knowledge`, matched on token ids at
  word boundaries) get the entity's definition embedding added (the teacher text tower's pooled
  embedding of the definition through the online g_t, refreshed every
  ``definition_refresh_every`` steps); then MGCA's word-patch token InfoNCE (tau 0.1) weighted
  by the encoders' last-layer [CLS] attention (:func:`medvlp.losses.local.mgca_local_loss`);
- category: one learnable prototype per class, seeded from the projected embedding of
  "name: definition"; Sinkhorn codes restricted to the classes a sample's labels allow (No
  Finding when none is positive; unlabelled samples unrestricted), class-frequency shares, and
  swapped prediction between image and text.

L = global_weight (L_mpNCE + kl_weight KL) + local_weight L_local + category_weight L_category.
Evaluation is a dual encoder (``encode_image`` / ``encode_text`` as CLIP; ``patch_embeddings``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from medvlp.distributed import gather_features
from medvlp.errors import ConfigError, DataError
from medvlp.losses.contrastive import info_nce, same_key_mask
from medvlp.losses.knowledge import (
    PhraseTable,
    allowed_categories,
    find_mentions,
    multi_positive_info_nce,
    restricted_sinkhorn,
    teacher_consistency_kl,
)
from medvlp.losses.local import mgca_local_loss
from medvlp.losses.prototypes import swapped_prediction_loss
from medvlp.methods.base import Method, build_towers
from medvlp.methods.clip import SharedSpace, SharedSpaceConfig, text_hashes
from medvlp.models.ema import EmaTeacher, cosine_momentum
from medvlp.registry import METHODS


@dataclass
class MlipConfig(SharedSpaceConfig):
    name: str = "mlip"
    # CLIP (same keys and defaults as the clip recipe)
    # divergence encoder (EMA teacher)
    ema_momentum: float = 0.996
    ema_schedule: Literal["cosine", "constant"] = "cosine"
    teacher_mask_ratio: float = 0.5
    teacher_token_drop: float = 0.1
    teacher_positives: bool = True
    kl_weight: float = 0.5
    # knowledge
    knowledge: str = ""  # knowledge-base YAML; empty = the one shipped with medvlp
    classes: list[str] = field(default_factory=list)  # empty = the dataset's (dataset.json), else the KB's
    no_finding_class: str = "No Finding"
    knowledge_weight: float = 1.0
    definition_refresh_every: int = 1
    local_tau: float = 0.1
    # category level
    category_temperature: float = 0.1
    sinkhorn_eps: float = 0.05
    sinkhorn_iters: int = 3
    uncertain_allowed: bool = True
    # loss weights
    global_weight: float = 1.0
    local_weight: float = 0.7
    category_weight: float = 0.5

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if not 0.0 <= self.ema_momentum <= 1.0:
            raise ConfigError(f"{prefix}.ema_momentum: must be within [0, 1], got {self.ema_momentum} (e.g. 0.996)")
        if not 0.0 <= self.teacher_mask_ratio < 1.0:
            raise ConfigError(f"{prefix}.teacher_mask_ratio: must be within [0, 1), got {self.teacher_mask_ratio}")
        if not 0.0 <= self.teacher_token_drop < 1.0:
            raise ConfigError(f"{prefix}.teacher_token_drop: must be within [0, 1), got {self.teacher_token_drop}")
        if self.definition_refresh_every < 1:
            raise ConfigError(f"{prefix}.definition_refresh_every: must be >= 1 (optimizer steps), "
                              f"got {self.definition_refresh_every}")
        for name in ("local_tau", "category_temperature", "sinkhorn_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{prefix}.{name}: must be > 0, got {getattr(self, name)}")
        if self.sinkhorn_iters < 1:
            raise ConfigError(f"{prefix}.sinkhorn_iters: must be >= 1, got {self.sinkhorn_iters}")
        if self.global_weight <= 0:
            raise ConfigError(f"{prefix}.global_weight: must be > 0 (zero-shot and retrieval use the global space), "
                              f"got {self.global_weight}")
        for name in ("kl_weight", "knowledge_weight", "local_weight", "category_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name}: must be >= 0 (0 turns it off), got {getattr(self, name)}")


class DualEncoder(nn.Module):
    """Groups the towers and projections so the EMA teacher copies exactly (E_v, E_t, g_v, g_t)."""

    def __init__(self, vision: nn.Module, text: nn.Module, image_proj: nn.Module, text_proj: nn.Module):
        super().__init__()
        self.vision, self.text, self.image_proj, self.text_proj = vision, text, image_proj, text_proj


def resolve_classes(cfg, knowledge) -> list[str]:
    """The prototypes' classes, in the order of the batches' label columns."""
    classes = list(cfg.method.classes)
    if not classes and cfg.data.manifest:
        from medvlp.data.manifest import read_info

        try:
            classes = list(read_info(cfg.data.manifest).get("classes") or [])
        except (OSError, DataError, ConfigError):
            classes = []  # e.g. a bundle evaluated where its training data is absent: fall back to the KB
    classes = classes or knowledge.classes
    unknown = [c for c in classes if c not in knowledge.entries]
    if unknown:
        raise ConfigError(f"method.classes: {unknown} are not in the knowledge base {knowledge.source}; add entries "
                          "for them to the file named by method.knowledge, or list only known classes in method.classes")
    return classes


def knowledge_phrases(knowledge, classes: list[str], tokenizer) -> PhraseTable:
    """Token-id sequences of every class's name and synonyms (and their plural), plus the
    exclusions (entity -1). Phrases with a "*" gap are left out (they need the labeler's
    word-gap matching; the contiguous synonyms cover the usual mentions)."""
    pairs: list[tuple[list[int], int]] = []

    unk = tokenizer.unk_token_id

    def add(phrase: str, entity: int) -> None:
        for variant in (phrase, phrase + "s"):
            ids = tokenizer(variant, add_special_tokens=False)["input_ids"]
            if unk not in ids:  # a phrase the vocabulary cannot spell would match any [UNK] run
                pairs.append((ids, entity))

    for k, name in enumerate(classes):
        entry = knowledge.entries[name]
        for phrase in entry.exclusions:
            add(phrase, -1)
        for phrase in [name.lower(), *entry.synonyms]:
            if "*" not in phrase:
                add(phrase, k)
    return PhraseTable.build(pairs)


@METHODS.register("mlip", MlipConfig, "MLIP: divergence encoder + token-knowledge-patch + knowledge-guided prototypes")
class Mlip(SharedSpace, Method):
    no_weight_decay = (*Method.no_weight_decay, "prototypes")

    def __init__(self, cfg, tokenizer, *, load_text_weights: bool = True):
        super().__init__()
        from medvlp.data.knowledge import load_knowledge

        self.cfg = m = cfg.method
        self.total_steps = cfg.train.steps
        knowledge = load_knowledge(m.knowledge or None)
        self.classes = resolve_classes(cfg, knowledge)
        self.no_finding = self.classes.index(m.no_finding_class) if m.no_finding_class in self.classes else None
        self.phrases = knowledge_phrases(knowledge, self.classes, tokenizer)

        self.vision, self.text = build_towers(cfg, tokenizer, load_text_weights=load_text_weights)
        self.build_shared_space(cfg)

        # definitions (for the token enrichment) and "name: definition" (for the prototype seeds)
        max_len = cfg.model.text.max_length
        enc = tokenizer([knowledge.definition(c) for c in self.classes], padding=True, truncation=True,
                        max_length=max_len, return_tensors="pt")
        self.register_buffer("definition_ids", enc["input_ids"], persistent=False)
        self.register_buffer("definition_mask", enc["attention_mask"], persistent=False)
        # the cache and its age are state (checkpointed) so a resumed run refreshes on the same steps
        self.register_buffer("definition_cache", torch.zeros(len(self.classes), self.text.width))
        self.register_buffer("definition_age", torch.zeros((), dtype=torch.long))
        seeds = tokenizer([f"{c}: {knowledge.definition(c)}" for c in self.classes], padding=True, truncation=True,
                          max_length=max_len, return_tensors="pt")
        self.prototypes = nn.Parameter(self._seed_prototypes(seeds["input_ids"], seeds["attention_mask"]))
        # built last, from the initialised student: teacher = student at step 0
        self.teacher = EmaTeacher(self._student(), m.ema_momentum)

    def _student(self) -> DualEncoder:
        # a fresh wrapper each time (no second registration of the student's modules)
        return DualEncoder(self.vision, self.text, self.image_proj, self.text_proj)

    @torch.no_grad()
    def _seed_prototypes(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        was_training = self.text.training
        self.text.eval()  # no dropout noise in the seeds
        seeds = F.normalize(self.text_proj(self.text(ids, mask).pooled).float(), dim=-1)
        self.text.train(was_training)
        return seeds.clone()

    # ------------------------------------------------------------------ encoders
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image_features(images)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(input_ids, attention_mask).pooled), dim=-1)

    def patch_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, D) L2-normalised projected patch tokens (for localisation maps)."""
        return F.normalize(self.image_proj(self.vision(images).tokens), dim=-1)

    def momentum(self, step: int) -> float:
        if self.cfg.ema_schedule == "constant":
            return self.cfg.ema_momentum
        return cosine_momentum(step, self.total_steps, self.cfg.ema_momentum)

    # ------------------------------------------------------------------ pieces
    @torch.no_grad()
    def _teacher_view(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """v', w': the teacher's embeddings of a patch-dropped image and a token-dropped report."""
        t, m = self.teacher.module, self.cfg
        v = t.vision(batch.images, mask_ratio=m.teacher_mask_ratio).pooled
        attn = batch.attention_mask
        if m.teacher_token_drop > 0:
            drop = (torch.rand(attn.shape, device=attn.device) < m.teacher_token_drop) & (batch.word_ids >= 0)
            attn = attn.masked_fill(drop, 0)  # special tokens ([CLS], [SEP]) always stay
        w = t.text(batch.input_ids, attn).pooled
        return F.normalize(t.image_proj(v), dim=-1), F.normalize(t.text_proj(w), dim=-1)

    def _definition_embeddings(self) -> torch.Tensor:
        """(K, width) pooled definition embeddings from the teacher's text tower (no gradient)."""
        if int(self.definition_age) <= 0:
            with torch.no_grad():
                pooled = self.teacher.module.text(self.definition_ids, self.definition_mask).pooled
            self.definition_cache.copy_(pooled.float())
            self.definition_age.fill_(self.cfg.definition_refresh_every)
        return self.definition_cache

    def _global_loss(self, batch, img, txt, scale) -> tuple[torch.Tensor, dict]:
        m = self.cfg
        all_img = gather_features(img, gather_with_grad=m.gather_with_grad)
        all_txt = gather_features(txt, gather_with_grad=m.gather_with_grad)
        mask = None
        if m.mask_identical_texts:
            mask = same_key_mask(gather_features(text_hashes(batch.texts, img.device), gather_with_grad=False))
        if m.kl_weight == 0 and not m.teacher_positives:
            return info_nce(all_img, all_txt, scale, negative_mask=mask), {}
        t_img, t_txt = (gather_features(x, gather_with_grad=False) for x in self._teacher_view(batch))
        if m.teacher_positives:
            contrast = multi_positive_info_nce(all_img, all_txt, t_img, t_txt, scale, negative_mask=mask)
        else:
            contrast = info_nce(all_img, all_txt, scale, negative_mask=mask)
        with torch.autocast(device_type=img.device.type, enabled=False):
            online = scale * (all_img.float() @ all_txt.float().t())
            teacher = scale.detach() * (t_img.float() @ t_txt.float().t())
        kl = teacher_consistency_kl(online, teacher)
        return contrast + m.kl_weight * kl, {"loss_contrast": contrast.detach(), "loss_kl": kl.detach()}

    def _local_loss(self, batch, vis, txt_out) -> tuple[torch.Tensor, torch.Tensor]:
        words = F.normalize(self.text_proj(txt_out.tokens), dim=-1)
        entity = find_mentions(batch.input_ids, batch.word_ids, self.phrases)  # (B, L), -1 = no mention
        mentioned = entity >= 0
        if self.cfg.knowledge_weight > 0:
            definitions = F.normalize(self.text_proj(self._definition_embeddings().to(words.dtype)), dim=-1)
            knowledge = definitions[entity.clamp(min=0)] * mentioned.unsqueeze(-1)
            words = words + self.cfg.knowledge_weight * knowledge
        patches = self.image_proj(vis.tokens)
        # importance is a weighting, not a target: detached so attention is not trained to game the loss
        loss = mgca_local_loss(words, batch.word_ids >= 0, patches,
                               word_importance=txt_out.cls_attention.mean(dim=1).detach(),
                               patch_importance=vis.cls_attention.mean(dim=1).detach(), tau=self.cfg.local_tau)
        return loss, mentioned.float().sum() / (batch.word_ids >= 0).sum().clamp(min=1)

    def _category_loss(self, batch, img, txt) -> torch.Tensor:
        m, k = self.cfg, len(self.classes)
        if batch.labels is not None and batch.labels.shape[1] != k:
            raise DataError(f"mlip: batch labels have {batch.labels.shape[1]} columns but the prototypes are the "
                            f"{k} classes {self.classes}; set method.classes to the dataset's classes, in order")
        allowed = allowed_categories(batch.labels, batch.has_labels, len(img), k, no_finding=self.no_finding,
                                     uncertain_allowed=m.uncertain_allowed, device=img.device)
        protos = F.normalize(self.prototypes, dim=-1)
        img_scores, txt_scores = img @ protos.t(), txt @ protos.t()
        img_codes = restricted_sinkhorn(img_scores, allowed, eps=m.sinkhorn_eps, iters=m.sinkhorn_iters)
        txt_codes = restricted_sinkhorn(txt_scores, allowed, eps=m.sinkhorn_eps, iters=m.sinkhorn_iters)
        return swapped_prediction_loss(img_scores, txt_scores, img_codes, txt_codes, m.category_temperature)

    # ------------------------------------------------------------------ training
    def forward(self, batch) -> dict[str, torch.Tensor]:
        m = self.cfg
        if batch.has_text is not None and not bool(batch.has_text.all()):
            raise ValueError("MLIP needs a report for every sample (as CLIP); filter image-only samples")
        attention = m.local_weight > 0
        vis = self.vision(batch.images, return_attention=attention)
        txt_out = self.text(batch.input_ids, batch.attention_mask, return_attention=attention)
        img = F.normalize(self.image_proj(vis.pooled), dim=-1)
        txt = F.normalize(self.text_proj(txt_out.pooled), dim=-1)
        scale = self.scale()

        loss_global, logs = self._global_loss(batch, img, txt, scale)
        loss = m.global_weight * loss_global
        logs = {"loss_global": loss_global.detach(), **logs}
        if m.local_weight > 0:
            loss_local, mention_fraction = self._local_loss(batch, vis, txt_out)
            loss = loss + m.local_weight * loss_local
            logs.update(loss_local=loss_local.detach(), mention_fraction=mention_fraction.detach())
        if m.category_weight > 0:
            loss_category = self._category_loss(batch, img, txt)
            loss = loss + m.category_weight * loss_category
            logs["loss_category"] = loss_category.detach()
        return {"loss": loss, **logs, "logit_scale": scale.detach()}

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        self.clamp_logit_scale()
        self.teacher.update(self._student(), self.momentum(step))
        self.definition_age.sub_(1)


__all__ = ["DualEncoder", "Mlip", "MlipConfig", "knowledge_phrases", "resolve_classes"]
