"""Detection from a frozen vision encoder: a linear CenterNet-style head on patch tokens, mAP.

Protocol (fixed constants below; docs/evaluation.md, section on detection):

1. **Boxes.** A manifest row's ``meta["findings"]`` lists findings with ``name`` (class) and
   ``bbox`` ``[x0, y0, x1, y1)`` in original image pixels (findings without a bbox, e.g. some
   atelectasis, are ignored). Boxes are mapped the way the loader maps the image
   (:func:`medvlp.data.transforms.to_tensor`): shifted by the centring padding to square when
   ``cfg.data.pad_to_square``, then divided by the side (resizing is a pure scale), giving
   ``[0, 1]`` coordinates of the model's input frame (:func:`normalise_boxes`).
2. **Features.** The vision tower runs once, frozen (:func:`medvlp.eval.segmentation.patch_features`),
   giving (I, N, D) tokens on a ``g x g`` grid, standardised with the training subset's statistics.
3. **Head.** One linear layer per patch maps D to ``K * 5`` numbers: per class an objectness
   logit and 4 box terms. Target (CenterNet-style): the patch containing the box centre is
   positive for the class; its box terms are the centre's offset inside that patch (``[0, 1]``,
   x and y) and ``log`` of the box width and height in patch units. Linear, so that the score
   measures what the frozen tokens hold rather than what a deep head can learn.
4. **Training.** Loss = BCE on objectness (mean over patches and classes, positives weighted
   by ``POS_WEIGHT`` since one patch in N is positive) + L1 on the box terms of positive
   patches. AdamW (``LR``, ``WEIGHT_DECAY``), ``STEPS`` steps of ``BATCH`` images drawn with
   replacement (seeded): the same number of updates at every fraction.
5. **Decoding.** Per test image and class, the ``TOP_K`` highest-scoring patches give boxes,
   score = sigmoid(objectness); greedy NMS at IoU ``NMS_IOU`` (:func:`nms`, vectorised over
   images and classes; torchvision is not a dependency).
6. **Metric.** mAP@0.5 and mAP@[.5:.95] on the test split (:func:`medvlp.eval.dense_metrics.mean_average_precision`),
   per class and mean over classes with test boxes, at 1 / 10 / 100 % of the training images
   (nested, stratified, seeded: :func:`medvlp.eval.segmentation.training_subsets`), averaged over seeds.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from medvlp.data.sample import Sample
from medvlp.data.shard_access import image_ref, open_image
from medvlp.errors import DataError
from medvlp.eval.dense_metrics import mean_average_precision
from medvlp.eval.linear_probe import fraction_key
from medvlp.eval.segmentation import (
    DenseTaskSkipped,
    frozen_patch_tokens,
    standardise,
    summarise_seeds,
    training_subsets,
)

STEPS = 1000  # regression to sub-patch precision needs more updates than segmentation
BATCH = 32
LR = 3e-3
WEIGHT_DECAY = 1e-4
POS_WEIGHT = 10.0   # objectness BCE weight of the (rare) positive patches
TOP_K = 3           # candidate patches per image and class
NMS_IOU = 0.5


# ------------------------------------------------------------------------------ boxes
def normalise_boxes(boxes: np.ndarray, height: int, width: int, pad_to_square: bool = True) -> np.ndarray:
    """(M, 4) pixel boxes of an (height, width) image -> (M, 4) boxes in [0, 1] of the model's input frame."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not pad_to_square:
        return b / np.array([width, height, width, height], dtype=np.float64)
    size = max(height, width)
    top, left = (size - height) // 2, (size - width) // 2  # as transforms._pad_square centres
    return (b + np.array([left, top, left, top], dtype=np.float64)) / size


def denormalise_boxes(boxes: np.ndarray, height: int, width: int, pad_to_square: bool = True) -> np.ndarray:
    """Inverse of :func:`normalise_boxes`: [0, 1] input-frame boxes -> original image pixels."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not pad_to_square:
        return b * np.array([width, height, width, height], dtype=np.float64)
    size = max(height, width)
    top, left = (size - height) // 2, (size - width) // 2
    return b * size - np.array([left, top, left, top], dtype=np.float64)


def sample_boxes(sample: Sample, classes: Sequence[str], pad_to_square: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A sample's boxes of ``classes``: ((M, 4) in [0, 1], (M,) class index). Reads the image size from the file header."""
    found = [(f["bbox"], classes.index(f["name"])) for f in sample.meta.get("findings") or []
             if f.get("bbox") is not None and f.get("name") in classes]
    if not found:
        return np.zeros((0, 4)), np.zeros(0, dtype=np.int64)
    try:
        with Image.open(open_image(image_ref(sample))) as im:  # a file or a shard member
            width, height = im.size
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"detection: cannot read the size of image {image_ref(sample)} (sample {sample.id}): {exc}; "
                        "check the manifest's image paths") from None
    boxes = normalise_boxes(np.array([b for b, _ in found]), height, width, pad_to_square)
    return boxes, np.array([k for _, k in found], dtype=np.int64)


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., n, 4) and (..., m, 4) boxes -> (..., n, m) IoU (0 where the union is empty)."""
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float = NMS_IOU) -> torch.Tensor:
    """Greedy non-maximum suppression over the last candidate axis, batched over leading axes.

    ``boxes`` (..., k, 4), ``scores`` (..., k) -> (..., k) bool keep flags (in the input order).
    A candidate is suppressed when a kept, higher-scoring candidate overlaps it with IoU above
    the threshold. The loop runs over the k candidates (few), everything else is batched."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    sb = boxes.gather(-2, order[..., None].expand(*order.shape, 4))
    over = pairwise_iou(sb, sb) > iou_threshold  # (..., k, k), sorted order
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    k = scores.shape[-1]
    later = torch.triu(torch.ones(k, k, dtype=torch.bool, device=scores.device), diagonal=1)
    for i in range(k):  # sequential by definition: whether i suppresses depends on i being kept
        keep = keep & ~(keep[..., i:i + 1] & over[..., i, :] & later[i])
    out = torch.empty_like(keep)
    out.scatter_(-1, order, keep)
    return out


# ------------------------------------------------------------------------------ targets and head
def center_targets(boxes: Sequence[tuple[np.ndarray, np.ndarray]], grid: int, n_classes: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image (boxes in [0, 1], class ids) -> objectness (I, N, K) float and box terms (I, N, K, 4).

    Box terms: centre offset inside its patch (x, y in [0, 1]) and log width / height in patch
    units; two boxes of a class centred in one patch keep the last (rare: devices)."""
    n_img = len(boxes)
    obj = torch.zeros(n_img, grid * grid, n_classes)
    reg = torch.zeros(n_img, grid * grid, n_classes, 4)
    img = np.concatenate([np.full(len(k), i) for i, (_, k) in enumerate(boxes)]) if n_img else np.zeros(0)
    b = np.concatenate([bx for bx, _ in boxes]) if n_img else np.zeros((0, 4))
    if len(b) == 0:
        return obj, reg
    cls = np.concatenate([k for _, k in boxes])
    c = (b[:, :2] + b[:, 2:]) / 2 * grid
    cell = np.clip(np.floor(c), 0, grid - 1).astype(np.int64)
    size = np.clip((b[:, 2:] - b[:, :2]) * grid, 1e-3, None)
    patch = cell[:, 1] * grid + cell[:, 0]  # row-major, as the tokens
    img, cls = torch.as_tensor(img, dtype=torch.long), torch.as_tensor(cls)
    patch = torch.as_tensor(patch)
    obj[img, patch, cls] = 1.0
    reg[img, patch, cls] = torch.as_tensor(np.concatenate([c - cell, np.log(size)], axis=1), dtype=torch.float32)
    return obj, reg


class LinearDetectionHead(nn.Module):
    """(B, N, D) tokens -> objectness logits (B, N, K) and box terms (B, N, K, 4)."""

    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.k = n_classes
        self.proj = nn.Linear(dim, n_classes * 5)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.proj(tokens).reshape(*tokens.shape[:2], self.k, 5)
        return out[..., 0], out[..., 1:]


def train_head(tokens: torch.Tensor, obj: torch.Tensor, reg: torch.Tensor, seed: int, *, steps: int = STEPS,
               batch: int = BATCH, lr: float = LR, device: torch.device | str = "cpu") -> LinearDetectionHead:
    """Fit a :class:`LinearDetectionHead` (objectness BCE + L1 on positive patches' box terms)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the layer's initialisation
    head = LinearDetectionHead(tokens.shape[-1], obj.shape[-1]).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    pos_weight = torch.tensor(POS_WEIGHT, device=device)
    for _ in range(steps):
        idx = torch.randint(len(tokens), (min(batch, len(tokens)),), generator=gen)
        x, t_obj, t_reg = tokens[idx].to(device), obj[idx].to(device), reg[idx].to(device)
        logit, box = head(x)
        loss = F.binary_cross_entropy_with_logits(logit, t_obj, pos_weight=pos_weight)
        pos = t_obj > 0
        if bool(pos.any()):
            loss = loss + F.l1_loss(box[pos], t_reg[pos])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.eval()


@torch.no_grad()
def decode(logit: torch.Tensor, box: torch.Tensor, top_k: int = TOP_K, iou_threshold: float = NMS_IOU
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(I, N, K) logits and (I, N, K, 4) box terms -> boxes (I, K, k, 4) in [0, 1], scores (I, K, k), keep (I, K, k)."""
    n = logit.shape[1]
    grid = math.isqrt(n)
    k = min(top_k, n)
    scores, patch = torch.sigmoid(logit).transpose(1, 2).topk(k, dim=-1)  # (I, K, k)
    terms = box.permute(0, 2, 1, 3).gather(2, patch[..., None].expand(-1, -1, -1, 4))  # (I, K, k, 4)
    cell = torch.stack([patch % grid, patch // grid], -1).float()
    centre = (cell + terms[..., :2].clamp(0, 1)) / grid
    half = terms[..., 2:].clamp(-10, math.log(2 * grid)).exp() / grid / 2
    boxes = torch.cat([centre - half, centre + half], -1).clamp(0, 1)
    return boxes, scores, nms(boxes, scores, iou_threshold)


def _detections(boxes, scores, keep, classes) -> dict:
    out = {}
    for c, name in enumerate(classes):
        img = torch.arange(len(boxes))[:, None].expand(-1, keep.shape[-1])
        sel = keep[:, c]
        out[name] = (boxes[:, c][sel].double().numpy(), scores[:, c][sel].double().numpy(), img[sel].numpy())
    return out


def _ground_truth(boxes: Sequence[tuple[np.ndarray, np.ndarray]], classes) -> dict:
    img = np.concatenate([np.full(len(k), i, dtype=np.int64) for i, (_, k) in enumerate(boxes)])
    b = np.concatenate([bx for bx, _ in boxes])
    cls = np.concatenate([k for _, k in boxes])
    return {name: (b[cls == c], img[cls == c]) for c, name in enumerate(classes)}


# ------------------------------------------------------------------------------ the task
def evaluate_detection(model, tokenizer, train_samples: Sequence[Sample], test_samples: Sequence[Sample], cfg,
                       classes: Sequence[str], *, fractions: Sequence[float] = (0.01, 0.1, 1.0),
                       seeds: Sequence[int] = (0,), min_positives: int = 1,
                       device: torch.device | str = "cpu") -> dict:
    """mAP of a linear CenterNet-style head on frozen patch tokens (see the module docstring).

    Args:
        model: a method with ``model.vision(images).tokens`` (B, N, D); left frozen.
        tokenizer: the model's tokenizer (the shared loader collates reports too).
        train_samples / test_samples: the training pool and the test split; samples without
            ``meta["findings"]`` are ignored, those with findings but no box are negatives.
        cfg: the run's config (preprocessing, ``eval.batch_size``).
        classes: the dataset's classes; those with a box in the training pool are scored (those
            with test boxes only are listed in ``unscored_test_only``).
    Returns ``{"fractions": {"0.01": {"map_50", "map_50_95", "sd", "per_class", "n_train"}, ...},
    "classes", "unscored_test_only", "grid", "n_test", "n_train_pool", "seeds", "protocol"}``; ``per_class`` holds AP@0.5
    (``sd`` is over seeds of ``map_50``; ``map_50_95_sd`` and ``per_class_50_95`` give the rest).
    Raises :class:`DenseTaskSkipped` when it does not apply.
    """
    pad = cfg.data.pad_to_square
    train = [s for s in train_samples if isinstance(s.meta.get("findings"), list)]
    test = [s for s in test_samples if isinstance(s.meta.get("findings"), list)]
    def boxed(samples):
        return {f.get("name") for s in samples for f in s.meta["findings"] if f.get("bbox") is not None}

    # a class is scored only if the head can learn it: one with test boxes but no training box would
    # add an AP of ~0 that depends on the test split alone; it is listed as unscored instead
    train_boxed, test_boxed = boxed(train), boxed(test)
    scored = [c for c in classes if c in train_boxed]
    test_only = [c for c in classes if c in test_boxed and c not in train_boxed]
    n_train_boxes = sum(f.get("bbox") is not None and f.get("name") in scored for s in train for f in s.meta["findings"])
    n_test_boxes = sum(f.get("bbox") is not None and f.get("name") in scored for s in test for f in s.meta["findings"])
    if not scored or not n_train_boxes or not n_test_boxes:
        raise DenseTaskSkipped(f"detection needs boxes (meta.findings[*].bbox) in both splits: {n_train_boxes} "
                               f"training and {n_test_boxes} test boxes of the given classes")
    train, test, train_tok, test_tok, grid = frozen_patch_tokens(model, tokenizer, train, test, cfg, classes,
                                                                 device=device)
    train_boxes = [sample_boxes(s, scored, pad) for s in train]
    test_boxes = [sample_boxes(s, scored, pad) for s in test]
    obj, reg = center_targets(train_boxes, grid, len(scored))
    truth = _ground_truth(test_boxes, scored)

    runs = []
    for seed, subsets in training_subsets(train, scored, fractions, seeds, min_positives).items():
        run = {}
        for f, idx in subsets.items():
            idx_t = torch.as_tensor(idx, dtype=torch.long)
            x_train, x_test = standardise(train_tok[idx_t], test_tok)
            head = train_head(x_train, obj[idx_t], reg[idx_t], seed, device=device)
            with torch.no_grad():
                logit, box = head(x_test.to(device))
            res = mean_average_precision(_detections(*decode(logit.cpu(), box.cpu()), scored), truth, scored)
            run[fraction_key(f)] = {"map_50": res["map_50"], "per_class": res["ap_50"], "n_train": len(idx),
                                    "map_50_95": res["map_50_95"], "per_class_50_95": res["ap_50_95"]}
        runs.append(run)
    out = summarise_seeds(runs, fractions, "map_50")
    other = summarise_seeds([{k: {**v, "per_class": v["per_class_50_95"], "map_50": v["map_50_95"]}
                              for k, v in r.items()} for r in runs], fractions, "map_50")
    for key, entry in out.items():
        entry.update(map_50_95=other[key]["map_50"], map_50_95_sd=other[key]["sd"],
                     per_class_50_95=other[key]["per_class"])
    return {
        "fractions": out, "classes": scored, "unscored_test_only": test_only, "grid": grid, "n_test": len(test), "n_train_pool": len(train),
        "seeds": list(seeds),
        "protocol": {"head": "linear per patch -> per class objectness + (dx, dy, log w, log h)",
                     "target": "patch containing the box centre", "loss": f"BCE (pos_weight {POS_WEIGHT}) + L1",
                     "steps": STEPS, "batch": BATCH, "lr": LR, "weight_decay": WEIGHT_DECAY,
                     "top_k": TOP_K, "nms_iou": NMS_IOU},
    }


__all__ = [
    "LinearDetectionHead",
    "center_targets",
    "decode",
    "denormalise_boxes",
    "evaluate_detection",
    "nms",
    "normalise_boxes",
    "pairwise_iou",
    "sample_boxes",
    "train_head",
]
