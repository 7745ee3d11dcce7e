"""Supervised ceiling: the CLIP image encoder trained directly on the labels.

Not a vision-language method: an upper reference for benchmarks. The ViT of
``model.vision`` (the same architecture as CLIP's image tower) feeds a linear head with
one logit per class; the loss is binary cross-entropy with logits over the label
matrix, averaged over the *valid* entries only:

    L = sum_{i,k} m_ik * BCE(z_ik, y_ik) / max(1, sum_{i,k} m_ik)

``MISSING`` (not mentioned) entries are always masked: the label is unknown, and reading
it as negative would teach the head that an unmentioned finding is absent. ``UNCERTAIN``
entries follow ``method.uncertain``: ``ignore`` (default, masked, as evaluation's AUROC
masks them), ``positive`` (CheXpert's U-Ones) or ``negative`` (U-Zeros).

There is no text tower: the method builds without a tokenizer and evaluation skips the
text tasks (zero-shot, retrieval) for it. Its linear-probe features are the encoder's
pooled output, as for CLIP, and evaluation also scores the head itself
(``supervised_head``) through ``head_classes`` / ``classify_features``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from medvlp.config import MethodConfig
from medvlp.data.sample import NEGATIVE, POSITIVE, UNCERTAIN
from medvlp.errors import DataError
from medvlp.methods.base import ImageOnlyMethod, dataset_classes
from medvlp.registry import METHODS


@dataclass
class SupervisedConfig(MethodConfig):
    name: str = "supervised"
    uncertain: Literal["ignore", "positive", "negative"] = "ignore"
    # the head's classes, in the order of the batches' label columns; leave empty to take the
    # training dataset's classes (dataset.json); loading a checkpoint fills it from the checkpoint
    classes: list[str] = field(default_factory=list)


def label_targets(codes: torch.Tensor, uncertain: str = "ignore") -> tuple[torch.Tensor, torch.Tensor]:
    """Label codes (B, K) -> (targets in {0, 1} as float (B, K), validity mask (B, K) bool)."""
    valid = (codes == POSITIVE) | (codes == NEGATIVE)
    targets = codes == POSITIVE
    if uncertain != "ignore":
        is_unc = codes == UNCERTAIN
        valid = valid | is_unc
        if uncertain == "positive":
            targets = targets | is_unc
    return targets.float(), valid


def masked_bce(logits: torch.Tensor, codes: torch.Tensor, uncertain: str = "ignore") -> torch.Tensor:
    """Mean BCE-with-logits over the valid label entries.

    Args:
        logits: (B, K) raw scores.
        codes: (B, K) label codes (POSITIVE 1, NEGATIVE 0, UNCERTAIN -1, MISSING -2).
        uncertain: ``ignore`` | ``positive`` | ``negative`` (what UNCERTAIN counts as).
    Returns a scalar; 0 (still attached to ``logits``) when no entry is valid.
    """
    if logits.shape != codes.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and label codes {tuple(codes.shape)} must have the same shape")
    targets, valid = label_targets(codes, uncertain)
    per_entry = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
    return (per_entry * valid).sum() / valid.sum().clamp(min=1)


def resolve_classes(cfg) -> list[str]:
    """The head's classes: ``method.classes`` or the training dataset's (dataset.json)."""
    return dataset_classes(cfg, "the supervised head")


@METHODS.register("supervised", SupervisedConfig, "Supervised ceiling: CLIP's ViT + linear head, masked BCE on labels")
class Supervised(ImageOnlyMethod):

    def __init__(self, cfg, tokenizer=None, *, load_text_weights: bool = True):
        super().__init__()
        from medvlp.models.vit import VisionTransformer

        self.cfg = cfg.method
        self.vision = VisionTransformer(cfg.model.vision)
        self.head_classes = resolve_classes(cfg)
        self.head = nn.Linear(self.vision.width, len(self.head_classes))

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled encoder features (N, D) -> class logits (N, K)."""
        return self.head(features)



    def forward(self, batch) -> dict[str, torch.Tensor]:
        if batch.labels is None or batch.labels.shape[1] != len(self.head_classes):
            got = None if batch.labels is None else tuple(batch.labels.shape)
            raise DataError(f"supervised: batch labels {got} do not match the head's {len(self.head_classes)} classes "
                            f"({', '.join(self.head_classes)}); train on a labelled split of the dataset the head was built for")
        logits = self.classify_features(self.image_features(batch.images))
        loss = masked_bce(logits, batch.labels, self.cfg.uncertain)
        valid = label_targets(batch.labels, self.cfg.uncertain)[1]
        return {"loss": loss, "loss_bce": loss.detach(), "valid_label_fraction": valid.float().mean().detach()}


__all__ = ["Supervised", "SupervisedConfig", "label_targets", "masked_bce", "resolve_classes"]
