"""Contrastive learning with label-derived positives: UniCL multi-positive and MedCLIP soft targets.

The image x text matrix may be rectangular (R images, C texts: images and texts need not come
in pairs). ``pair`` (R,) gives the column of each image's own report (-1 when it has none).
Label vectors are the CheXpert-style codes of :mod:`medvlp.data.sample`; a sample "has labels"
when any code is not MISSING, and its positive vector is 1 where the code is POSITIVE.

- ``mode="equal"`` (UniCL): the positives of image i are its own report and every text whose
  positive vector equals y_i; the target is uniform over them.
- ``mode="soft"`` (MedCLIP): target row i = softmax over columns of cos(y_i, y_k) / tau_t
  (label vectors L2-normalised), among the columns with labels, plus its own report.
- Rows without labels (or with an all-zero positive vector) fall back to the one-hot target of
  their own report; rows with neither are left out. ``same`` (R, C) optionally marks columns
  that are not negatives (identical report texts): they are removed from the softmax denominator
  unless they are targets.
With all label vectors distinct and a square one-to-one pairing, ``mode="equal"`` gives exactly
CLIP's symmetric InfoNCE; ``mode="soft"`` tends to it as ``tau_t`` -> 0 (the label-cosine
softmax puts weight exp(-(1 - cos) / tau_t) on other labelled texts; with ``tau_t`` = 0.01 and
distinct vectors that weight is at most e^-29 per text relative to the own report's when their
cosine is at most 0.71).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from medvlp.data.sample import MISSING, POSITIVE


def label_targets(row_codes: torch.Tensor, col_codes: torch.Tensor, pair: torch.Tensor, *,
                  mode: Literal["equal", "soft"] = "equal", tau_t: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets (R, C), each row a distribution, and (R,) bool: rows that have a target."""
    r, c = row_codes.shape[0], col_codes.shape[0]
    y_r, y_c = (row_codes == POSITIVE).float(), (col_codes == POSITIVE).float()
    lab_r = (row_codes != MISSING).any(1) & (y_r.sum(1) > 0)
    lab_c = (col_codes != MISSING).any(1) & (y_c.sum(1) > 0)
    own = torch.zeros(r, c, dtype=torch.bool, device=row_codes.device)
    has_pair = pair >= 0
    own[has_pair.nonzero().squeeze(1), pair[has_pair]] = True
    both = lab_r[:, None] & lab_c[None, :]
    if mode == "equal":
        weight = (both & (y_r[:, None, :] == y_c[None, :, :]).all(-1)) | own
        weight = weight.float()
    elif mode == "soft":
        cos = F.normalize(y_r, dim=1) @ F.normalize(y_c, dim=1).t()
        logits = torch.where(both | own, torch.where(own, torch.ones_like(cos), cos) / tau_t,
                             torch.full_like(cos, float("-inf")))
        weight = torch.softmax(logits.masked_fill(~(both | own).any(1, keepdim=True), 0.0), dim=1)
        weight = weight.masked_fill(~(both | own), 0.0)
    else:
        raise ValueError(f"label_targets: mode must be 'equal' or 'soft', got {mode!r}")
    # rows without labels: the one-hot target of their own report
    weight = torch.where(lab_r[:, None], weight, own.float())
    valid = weight.sum(1) > 0
    return weight / weight.sum(1, keepdim=True).clamp(min=1e-12), valid


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                       not_negative: torch.Tensor | None = None) -> torch.Tensor:
    """mean over valid rows of -sum_k t_ik log softmax_k(logits_ik), in fp32."""
    logits = logits.float()
    if not_negative is not None:  # drop non-negatives from the denominator unless they are targets
        logits = logits.masked_fill(not_negative & (targets == 0), float("-inf"))
    log_p = torch.log_softmax(logits, dim=1)
    per_row = -(targets * log_p.masked_fill(targets == 0, 0.0)).sum(1)
    return per_row[valid].mean() if bool(valid.any()) else logits.sum() * 0.0


def label_contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                           logit_scale: torch.Tensor | float, image_codes: torch.Tensor, text_codes: torch.Tensor,
                           pair: torch.Tensor, *, mode: Literal["equal", "soft"] = "equal", tau_t: float = 0.1,
                           same: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric image->text and text->image loss with label-derived targets.

    Args:
        image_features: (R, D) and text_features (C, D), L2-normalised.
        image_codes: (R, K) and text_codes (C, K) label codes.
        pair: (R,) column of each image's own report, -1 if none.
        same: optional (R, C) bool of non-negative pairs (identical report texts).
    """
    s = float(logit_scale) if not torch.is_tensor(logit_scale) else logit_scale.float()
    logits = s * image_features.float() @ text_features.float().t()  # (R, C)
    t_i2t, v_i2t = label_targets(image_codes, text_codes, pair, mode=mode, tau_t=tau_t)
    # the text side: text k's own image is the row whose pair is k
    c = text_features.shape[0]
    inverse = torch.full((c,), -1, dtype=torch.long, device=pair.device)
    has = pair >= 0
    inverse[pair[has]] = has.nonzero().squeeze(1)
    t_t2i, v_t2i = label_targets(text_codes, image_codes, inverse, mode=mode, tau_t=tau_t)
    same_t = same.t() if same is not None else None
    return 0.5 * (soft_cross_entropy(logits, t_i2t, v_i2t, same) + soft_cross_entropy(logits.t(), t_t2i, v_t2i, same_t))
