"""MedCLIP baseline (METHODS.md "Baselines"): CLIP's towers with soft label-similarity targets
over a possibly rectangular image x text matrix.

Rows are every image of the batch; columns are the reports of the samples that have one
(``batch.has_text``). A paired sample gives a row and a column (its pair); an image-only
labelled sample (``data.sources`` kind ``labeled``) gives a row without a column: it contrasts
against all of the batch's reports with targets from label similarity alone. Targets come from
:func:`~medvlp.losses.soft_contrastive.label_contrastive_loss` in ``soft`` mode: label vectors
(positive = 1, all other codes 0) are L2-normalised, target row i = softmax over the labelled
columns of cos(y_i, y_k) / ``tau_t`` (its own report counts as cosine 1), soft cross-entropy
both ways; a sample without labels falls back to the one-hot target of its pair, and an
image with neither a report nor labels (kind ``unpaired``) has no target and is left out.

A labelled report without an image (``data.sources`` kind ``report``: the batch row has
``has_image`` False and a zero image that is never encoded) gives a column without a row: it
is a target of every image row by label similarity, and its text->image row uses label
targets only. So image-only and text-only labelled data both train, as in MedCLIP.

Distributed: features, label codes and pair indices are all-gathered (features with gradient
when ``gather_with_grad``) and every rank computes the whole matrix, which is exact (see
:mod:`medvlp.losses.contrastive`). The mixed stream gives every rank the same number of
images and reports per batch, which the gather needs (checked: a clear error otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from medvlp.data.sample import MISSING
from medvlp.distributed import all_reduce_max, gather_features, get_rank, get_world_size
from medvlp.errors import ConfigError, DataError
from medvlp.losses.soft_contrastive import label_contrastive_loss
from medvlp.methods.clip import Clip, ClipConfig, text_hashes
from medvlp.registry import METHODS


@dataclass
class MedclipConfig(ClipConfig):
    name: str = "medclip"
    tau_t: float = 0.1  # temperature of the label-similarity softmax that makes the targets

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.tau_t <= 0:
            raise ConfigError(f"{prefix}.tau_t: must be > 0, got {self.tau_t}")
        if self.local_loss:
            raise ConfigError(f"{prefix}.local_loss: not supported by medclip (the soft targets need the whole "
                              "gathered matrix); set it to false")


def pair_columns(has_text: torch.Tensor) -> torch.Tensor:
    """(B,) column of each sample's report among the batch's reports (in order), -1 for none."""
    return torch.where(has_text, has_text.long().cumsum(0) - 1, torch.full_like(has_text, -1, dtype=torch.long))


@METHODS.register("medclip", MedclipConfig, "MedCLIP: soft label-similarity targets over image x text, image-label data too")
class Medclip(Clip):
    takes_report_only_rows = True  # a report source's rows are text columns without an image row

    def forward(self, batch) -> dict[str, torch.Tensor]:
        m = self.cfg
        has_text = batch.has_text.bool()
        has_image = batch.has_image.bool() if batch.has_image is not None else torch.ones_like(has_text)
        codes = batch.labels if batch.labels is not None else torch.full(
            (len(batch), 1), MISSING, dtype=torch.long, device=batch.images.device)
        image_rows = has_image.nonzero().squeeze(1)
        text_rows = has_text.nonzero().squeeze(1)
        img = self.encode_image(batch.images[image_rows])
        txt = self.encode_text(batch.input_ids[text_rows], batch.attention_mask[text_rows])
        pair = pair_columns(has_text)[image_rows]
        # images without a report get a key no column has (unique across ranks too)
        row_keys = -1 - (get_rank() * len(batch) + torch.arange(len(batch), device=img.device))
        if m.mask_identical_texts and len(text_rows):
            hashes = text_hashes([batch.texts[i] for i in text_rows.tolist()], img.device)
            row_keys = row_keys.masked_scatter(has_text, hashes)
        else:
            hashes = torch.full((len(text_rows),), -(1 << 62), dtype=torch.long, device=img.device)
        row_keys, text_codes, codes = row_keys[image_rows], codes[text_rows], codes[image_rows]

        world = get_world_size()
        if world > 1:
            n = (len(image_rows), len(text_rows))
            counts = all_reduce_max(torch.tensor([n[0], -n[0], n[1], -n[1]], device=img.device))
            if int(counts[0]) != -int(counts[1]) or int(counts[2]) != -int(counts[3]):
                raise DataError(
                    f"medclip: the ranks' batches hold different numbers of images ({-int(counts[1])} to "
                    f"{int(counts[0])}) or reports ({-int(counts[3])} to {int(counts[2])}); the cross-rank gather "
                    "needs the same numbers on every rank. Fix: mix sources with data.sources (fixed per-batch "
                    "counts per source) rather than a split whose samples lack reports at random")
            # every rank's rows and columns, rank order; pairs point into the gathered columns
            pair = pair + (pair >= 0) * get_rank() * len(text_rows)
            img, txt = (gather_features(x, gather_with_grad=m.gather_with_grad) for x in (img, txt))
            pair, row_keys, hashes, text_codes, codes = (gather_features(x, gather_with_grad=False) for x in (
                pair, row_keys, hashes, text_codes, codes))
        same = row_keys[:, None] == hashes[None, :] if m.mask_identical_texts else None
        scale = self.scale()
        loss = label_contrastive_loss(img, txt, scale, codes, text_codes, pair, mode="soft", tau_t=m.tau_t, same=same)
        n_labelled_images = ((codes != MISSING).any(1) & (pair < 0)).sum()
        n_reports_only = txt.shape[0] - (pair >= 0).sum()  # columns no image row is paired with
        return {"loss": loss, "loss_medclip": loss.detach(), "logit_scale": scale.detach(),
                "n_image_label": n_labelled_images.float(), "n_report_only": n_reports_only.float()}


__all__ = ["Medclip", "MedclipConfig", "pair_columns"]
