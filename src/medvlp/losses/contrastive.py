"""CLIP / ConVIRT image-text contrastive loss (symmetric InfoNCE), with cross-rank gathering.

Pure tensor code: no training-loop imports. Conventions (METHODS.md):

* features arrive L2-normalised from the caller;
* ``logit_scale`` is ``exp`` of a learned log scale, already clamped by the caller
  (at most 100); the loss only multiplies by it;
* logits and cross-entropies are computed in fp32 with autocast disabled, whatever the
  input dtype (bf16 features are upcast);
* an optional ``negative_mask`` removes pairs that are not true negatives (identical
  report texts, identical label vectors) by setting their logits to ``-inf``; the
  target pair itself is never removed.

Distributed training (:class:`ClipLoss`), with W ranks of B pairs each and L the loss a
single process would compute on the global batch of N = W*B pairs. DDP averages
parameter gradients over ranks, so the effective gradient is (1/W) * sum_r dL_r/dtheta,
where rank r's backward includes what flows through the gather:

* ``local_loss=False, gather_with_grad=True``: every rank computes the full N x N loss,
  L_r = L. The gather's backward sums over ranks, so rank s receives W * dL/df_s for its
  own features; DDP's 1/W cancels the W. **Exact.**
* ``local_loss=True, gather_with_grad=True``: rank r computes its B rows against all N
  columns in both directions (targets offset by r*B); mean_r L_r = L, and the gather's
  backward adds the gradient that other ranks' rows send to rank s's features as
  negatives. **Exact**, with W x less logit compute than the global variant.
* ``local_loss=True, gather_with_grad=False``: rank s only gets dL_s/df_s; the terms from
  its features acting as negatives in other ranks' rows are lost. **Biased** (a
  different gradient, not only a different scale): avoid.
* ``local_loss=False, gather_with_grad=False``: rank s gets the complete partial
  dL/df_s (its features are both rows and columns of its local matrix), so DDP yields
  (1/W) * dL/dtheta for the encoders, while ``logit_scale`` gets the full dL/dscale.
  Right direction, encoder gradients scaled by 1/W.

The loss value logged under ``local_loss=True`` is the rank's own; average it over ranks
to get L. Every rank must hold the same B (drop the last incomplete batch under DDP).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medvlp.distributed import gather_features, get_rank, get_world_size

__all__ = ["contrastive_cross_entropy", "info_nce", "same_key_mask", "ClipLoss"]

#: target value marking a row without a positive (an unpaired sample): it is skipped
NO_TARGET = -1


def same_key_mask(row_keys: torch.Tensor, col_keys: torch.Tensor | None = None) -> torch.Tensor:
    """Pairs whose keys are equal (e.g. hashes of report texts): not true negatives.

    Args:
        row_keys: (R,) integer keys of the rows (images' paired texts).
        col_keys: (C,) integer keys of the columns; defaults to ``row_keys``.

    Returns:
        (R, C) bool, True where the keys match (the diagonal included: the losses
        always keep the target pair, so it need not be cleared).
    """
    col_keys = row_keys if col_keys is None else col_keys
    return row_keys[:, None] == col_keys[None, :]


def _scaled_logits(queries: torch.Tensor, keys: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """fp32 ``logit_scale * queries @ keys.T``, outside autocast: (R, D), (C, D) -> (R, C)."""
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"expected (R, D) and (C, D) features, got {tuple(queries.shape)} and {tuple(keys.shape)}")
    scale = logit_scale.float() if isinstance(logit_scale, torch.Tensor) else float(logit_scale)
    with torch.autocast(device_type=queries.device.type, enabled=False):
        return scale * (queries.float() @ keys.float().t())


def _masked_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, negative_mask: torch.Tensor | None
) -> torch.Tensor:
    """Mean cross-entropy over rows that have a target.

    logits (R, C) fp32; targets (R,) int64 column index or ``NO_TARGET``; negative_mask
    (R, C) bool or None, True = drop that logit from the row's softmax. The target logit
    and rows without a target are never masked (no row becomes all ``-inf``).
    Returns a scalar; 0 (still attached to the graph) when no row has a target.
    """
    targets = targets.clamp_min(NO_TARGET)
    has_target = targets != NO_TARGET
    if negative_mask is not None:
        if negative_mask.shape != logits.shape:
            raise ValueError(
                f"negative_mask has shape {tuple(negative_mask.shape)} but the logits are {tuple(logits.shape)}"
            )
        columns = torch.arange(logits.shape[1], device=logits.device)
        is_target = columns[None, :] == targets[:, None]
        drop = negative_mask.to(device=logits.device, dtype=torch.bool) & ~is_target & has_target[:, None]
        logits = logits.masked_fill(drop, float("-inf"))
    total = F.cross_entropy(logits, targets, ignore_index=NO_TARGET, reduction="sum")
    return total / has_target.sum().clamp_min(1)


def contrastive_cross_entropy(
    queries: torch.Tensor,
    keys: torch.Tensor,
    logit_scale: torch.Tensor | float,
    targets: torch.Tensor,
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One direction of InfoNCE: each query row against all keys.

    Args:
        queries: (R, D) L2-normalised features (any float dtype).
        keys: (C, D) L2-normalised features.
        logit_scale: scalar tensor or float, 1/tau.
        targets: (R,) int64, the index in ``keys`` of each query's positive, or -1 for a
            query without one (skipped).
        negative_mask: optional (R, C) bool, True = not a negative for that query.

    Returns:
        fp32 scalar: mean over queries with a target of -log softmax(s_q.)[target].
    """
    return _masked_cross_entropy(_scaled_logits(queries, keys, logit_scale), targets, negative_mask)


def info_nce(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    labels: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE: 1/2 [CE(s_i., target(i)) + CE(s_.k, target(k))].

    ``s = logit_scale * image_features @ text_features.T`` is (R, C) and computed once.

    Args:
        image_features: (R, D) L2-normalised image embeddings (fp32 or bf16).
        text_features: (C, D) L2-normalised text embeddings.
        logit_scale: scalar tensor or float, 1/tau (clamped by the caller).
        labels: (R,) int64, the column of each image's paired text, or -1 for an image
            without one. Default ``arange(R)`` (needs R == C). Paired columns must be
            distinct. Rectangular matrices are allowed: texts paired with no image are
            extra negatives for the image->text term; images without a text are extra
            negatives for the text->image term, which runs over the paired columns.
        negative_mask: optional (R, C) bool over the same matrix, True = remove the pair
            from the negatives (in both directions); the target pairs are always kept.

    Returns:
        fp32 scalar; each term is a mean over the paired samples.
    """
    rows, cols = image_features.shape[0], text_features.shape[0]
    device = image_features.device
    if labels is None:
        if rows != cols:
            raise ValueError(f"info_nce on a rectangular {rows} x {cols} matrix needs `labels` (row -> paired column)")
        labels = torch.arange(rows, device=device)
    elif labels.shape != (rows,):
        raise ValueError(f"labels must have shape ({rows},), got {tuple(labels.shape)}")
    labels = labels.to(device=device, dtype=torch.long).clamp_min(NO_TARGET)
    logits = _scaled_logits(image_features, text_features, logit_scale)

    # Column targets: the row paired with each column, NO_TARGET for unpaired columns.
    # Unpaired rows scatter into an extra slot that is then dropped (no data-dependent shapes).
    column_targets = torch.full((cols + 1,), NO_TARGET, dtype=torch.long, device=device)
    slots = torch.where(labels >= 0, labels, torch.full_like(labels, cols))
    column_targets.scatter_(0, slots, torch.arange(rows, device=device))
    column_targets = column_targets[:cols]

    mask_t = None if negative_mask is None else negative_mask.t()
    image_to_text = _masked_cross_entropy(logits, labels, negative_mask)
    text_to_image = _masked_cross_entropy(logits.t(), column_targets, mask_t)
    return 0.5 * (image_to_text + text_to_image)


class ClipLoss(nn.Module):
    """CLIP / ConVIRT loss over in-batch pairs, all-gathered across ranks under DDP.

    Args:
        gather_with_grad: gradients flow through the cross-rank gather (needed for exact
            gradients with ``local_loss=True``; see the module docstring).
        local_loss: each rank computes only its own B rows against all N gathered
            columns, in both directions (B x N instead of N x N logits).

    Forward:
        image_features: (B, D) this rank's L2-normalised image embeddings.
        text_features: (B, D) their paired L2-normalised text embeddings (row i with i).
        logit_scale: scalar tensor or float, 1/tau (clamped by the caller).
        negative_mask: optional (N, N) bool over the gathered image x text matrix
            (N = world * B, rank order), True = not a negative; it must be the same on
            every rank. Under ``local_loss`` each rank takes its slices of it.
        pair_keys: optional (B,) integer keys per pair (e.g. a hash of the report text);
            pairs with equal keys are removed from each other's negatives. Gathered
            across ranks; combined with ``negative_mask`` by OR.

    Returns:
        fp32 scalar loss (the rank's own share under ``local_loss=True``).
    """

    def __init__(self, *, gather_with_grad: bool = True, local_loss: bool = False):
        super().__init__()
        self.gather_with_grad = gather_with_grad
        self.local_loss = local_loss

    def extra_repr(self) -> str:
        return f"gather_with_grad={self.gather_with_grad}, local_loss={self.local_loss}"

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        negative_mask: torch.Tensor | None = None,
        *,
        pair_keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if image_features.shape != text_features.shape or image_features.ndim != 2:
            raise ValueError(
                "ClipLoss expects paired (B, D) image and text features, got "
                f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
            )
        batch, world, rank = image_features.shape[0], get_world_size(), get_rank()
        total = world * batch
        all_images = gather_features(image_features, gather_with_grad=self.gather_with_grad)
        all_texts = gather_features(text_features, gather_with_grad=self.gather_with_grad)

        if negative_mask is not None and negative_mask.shape != (total, total):
            raise ValueError(
                f"negative_mask must be ({total}, {total}) over the gathered batch "
                f"(world {world} x batch {batch}), got {tuple(negative_mask.shape)}"
            )
        if pair_keys is not None:
            if pair_keys.shape != (batch,):
                raise ValueError(f"pair_keys must have shape ({batch},), got {tuple(pair_keys.shape)}")
            all_keys = gather_features(pair_keys, gather_with_grad=False)
            same = same_key_mask(all_keys)
            negative_mask = same if negative_mask is None else negative_mask | same

        if not self.local_loss:
            return info_nce(all_images, all_texts, logit_scale, negative_mask=negative_mask)

        offset = rank * batch
        targets = torch.arange(offset, offset + batch, device=image_features.device)
        image_mask = text_mask = None
        if negative_mask is not None:
            image_mask = negative_mask[offset : offset + batch]  # local images x all texts
            text_mask = negative_mask[:, offset : offset + batch].t()  # local texts x all images
        image_to_text = contrastive_cross_entropy(image_features, all_texts, logit_scale, targets, image_mask)
        text_to_image = contrastive_cross_entropy(text_features, all_images, logit_scale, targets, text_mask)
        return 0.5 * (image_to_text + text_to_image)
