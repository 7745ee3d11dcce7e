"""Segmentation from a frozen (or, optionally, fine-tuned) vision encoder: a light decoder on
patch tokens, Dice per finding.

Protocol (fixed; docs/evaluation_dense.md, with the measurements that chose it):

1. **Features.** The vision tower runs once, frozen, on every image that has a finding mask
   (``meta["mask"]``, SynthCXR's 16-bit class-bit PNG): ``model.vision(images).tokens`` gives
   (I, N, D) patch tokens on a ``g x g`` grid (``g = image_size / patch_size``). Tokens are
   standardised with the training subset's per-channel mean and std.
2. **Decoder** (:class:`PatchDecoder`). A 3x3 convolution over the token grid (``HIDDEN``
   channels, GELU), then a per-patch linear map to ``K * SUB * SUB`` logits, pixel-shuffled into
   K maps at ``SUB * g`` (``SUB = min(patch_size, MAX_SUB)``) and bilinearly upsampled to the
   input size. One hidden layer and a 3 x 3 token neighbourhood: light enough that the score
   follows what the tokens hold (a random-init encoder stays well below a trained one), while a
   purely linear per-patch map was under-fitted and scored near zero on every encoder.
3. **Training.** Masks are padded to square like the images and area-averaged to ``SUB * g``
   (soft targets, stored as uint8). Loss = BCE with a per-class positive weight
   ``sqrt(negative / positive pixel share)`` of the training subset, capped at ``POS_WEIGHT_MAX``
   (findings cover 0.05-20 % of the image) + soft Dice (smoothed by 1, mean over image-class pairs).
   AdamW (``LR``, ``WEIGHT_DECAY``), ``STEPS`` steps of ``BATCH`` images drawn with replacement:
   the same number of updates at every fraction, so fractions differ only in data.
4. **Fractions.** 1 / 10 / 100 % of the training split's masked images, nested, stratified and
   seeded with :func:`medvlp.eval.linear_probe.fraction_indices` (at least ``min_positives``
   positives per class where the pool has them).
5. **Metric.** On the test split, at the model's input resolution (ground truth padded, then
   area-resized, a pixel is inside at >= 0.5), prediction = sigmoid > ``THRESHOLD``; Dice per
   (image, class) with the empty-empty pairs left out (:mod:`medvlp.eval.dense_metrics`),
   averaged per class, then over classes (``dice``). ``dice_large`` averages the classes whose
   median mask area where present (training pool) is at least ``LARGE_MIN_PATCHES`` patches: a
   finding smaller than one token is at the limit of what a ``g x g`` grid can draw. "No Finding"
   has no mask and is not scored.

With ``encoder="finetune"`` (``eval.segmentation_encoder``) a copy of the vision tower trains
with the decoder (:class:`FinetunedTokens`: layer-wise decayed rates as the finetune task, the
frozen tokens' statistics for standardisation); everything else is the same.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medvlp.data.sample import Sample
from medvlp.errors import EvaluationError
from medvlp.eval.dense_metrics import dice_from_stats, dice_per_class, dice_stats
from medvlp.eval.finetune import LAYER_DECAY, _lr_factor, layer_id
from medvlp.eval.finetune import WEIGHT_DECAY as FT_WEIGHT_DECAY
from medvlp.eval.linear_probe import fraction_indices, fraction_key
from medvlp.eval.localization import read_sample_masks

MAX_SUB = 4         # sub-patch resolution: min(patch_size, MAX_SUB) squared logits per patch and class
HIDDEN = 128        # channels of the decoder's 3x3 convolution over the token grid
STEPS = 300         # updates at every fraction (the same number, so fractions differ only in data)
BATCH = 32
LR = 3e-3
WEIGHT_DECAY = 1e-4
ENCODER_LR = 1e-3   # top of the encoder's layer-wise decayed rates when it is fine-tuned (finetune task's LR)
POS_WEIGHT_MAX = 10.0  # BCE positive weight per class, sqrt(neg / pos pixel share), capped here
THRESHOLD = 0.5
LARGE_MIN_PATCHES = 1.0  # "large" classes: median mask area (where present, training pool) >= this many patches


class DenseTaskSkipped(Exception):
    """A dense task does not apply (no vision tower, no masks / boxes); the message says why."""


# ------------------------------------------------------------------------------ shared helpers
@torch.no_grad()
def patch_features(model, tokenizer, samples: Sequence[Sample], cfg, classes: Sequence[str], *,
                   device: torch.device | str = "cpu") -> tuple[list[str], torch.Tensor]:
    """Frozen patch tokens of ``samples``: (ids in loader order, (I, N, D) float32 on the CPU).

    Unreadable images are skipped by the loader; the ids say which images the rows belong to."""
    from medvlp.data.loader import make_loader

    vision = getattr(model, "vision", None)
    if not callable(vision):
        raise DenseTaskSkipped(f"{type(model).__name__} has no vision tower (model.vision)")
    ids, feats = [], []
    for batch in make_loader(samples, cfg, tokenizer, classes, batch_size=cfg.eval.batch_size):
        tokens = vision(batch.images.to(device)).tokens
        if tokens is None or tokens.dim() != 3:
            raise DenseTaskSkipped(f"{type(model).__name__}.vision gives no (B, N, D) patch tokens")
        feats.append(tokens.float().cpu())
        ids += list(batch.ids)
    if not feats:
        raise DenseTaskSkipped("no image to encode")
    tokens = torch.cat(feats)
    grid = math.isqrt(tokens.shape[1])
    if grid * grid != tokens.shape[1]:
        raise DenseTaskSkipped(f"the vision tower gives {tokens.shape[1]} patch tokens, not a square grid")
    return ids, tokens


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Scale (.., D) features by the training rows' per-channel mean and std (std floored)."""
    flat = train.reshape(-1, train.shape[-1])
    mean, std = flat.mean(0), flat.std(0).clamp(min=1e-6) if len(flat) > 1 else torch.ones(flat.shape[-1])
    return [(x - mean) / std for x in (train, *others)]


def pad_square_batch(x: torch.Tensor) -> torch.Tensor:
    """(.., H, W) -> (.., S, S) zero-padded, centred the way :func:`medvlp.data.transforms._pad_square` pads."""
    h, w = x.shape[-2:]
    if h == w:
        return x
    size = max(h, w)
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(x, (left, size - w - left, top, size - h - top))


def mask_targets(samples: Sequence[Sample], root: Path, classes: Sequence[str], size: int,
                 pad_to_square: bool = True, at_least: float | None = None) -> torch.Tensor:
    """(I, K, size, size) float in [0, 1]: each class's mask area fraction per output pixel; with
    ``at_least``, bool (fraction >= at_least), thresholded image by image (1 byte a pixel held)."""
    from medvlp.data.synth.generator import CLASSES as MASK_CLASSES

    bits = [MASK_CLASSES.index(c) for c in classes]
    out = []
    for s in samples:  # one file (or shard member) per image: the loop is over reads
        m = torch.from_numpy(read_sample_masks(s, root, bits).astype(np.float32))
        if pad_to_square:
            m = pad_square_batch(m)
        pooled = F.adaptive_avg_pool2d(m[None], size)[0]
        out.append(pooled if at_least is None else pooled >= at_least)
    return torch.stack(out)


def training_subsets(samples: Sequence[Sample], classes: Sequence[str], fractions: Sequence[float],
                     seeds: Sequence[int], min_positives: int) -> dict[int, dict[float, np.ndarray]]:
    """``{seed: {fraction: row indices}}``: nested, stratified fractions of ``samples``."""
    labels = np.array([s.label_vector(list(classes)) for s in samples], dtype=np.int64).reshape(len(samples), -1)
    return {seed: fraction_indices(labels, fractions, min_positives, seed) for seed in seeds}


def summarise_seeds(runs: list[dict], fractions: Sequence[float], key: str) -> dict:
    """Per fraction: mean and sd (ddof=1; 0 for one seed) of ``run[key]`` over seeds, per-class means."""
    out = {}
    for f in fractions:
        rs = [r[fraction_key(f)] for r in runs]
        vals = [r[key] for r in rs if r[key] is not None]
        per_class_keys = sorted({c for r in rs for c in r["per_class"]})
        out[fraction_key(f)] = {
            key: float(np.mean(vals)) if vals else None,
            "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
            "per_class": {c: float(np.mean([r["per_class"][c] for r in rs if c in r["per_class"]]))
                          for c in per_class_keys},
            "n_train": [r["n_train"] for r in rs],
        }
    return out


# ------------------------------------------------------------------------------ the decoder
class FinetunedTokens(nn.Module):
    """A copy of a vision tower trained with the decoder: images -> (B, N, D) patch tokens,
    standardised by fixed statistics (the frozen tokens' of the training subset, so that the
    decoder starts from the same input scale as in the frozen protocol). Its parameters get the
    finetune task's layer-wise decayed learning rates (``ENCODER_LR`` x ``LAYER_DECAY`` ^ depth
    below the top) with warm-up and cosine decay."""

    def __init__(self, vision: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        import copy

        self.vision = copy.deepcopy(vision).train()
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())
        self.dim = int(mean.shape[-1])
        self._base: list[float] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (self.vision(images).tokens.float() - self.mean) / self.std

    def param_groups(self) -> list[dict]:
        blocks = getattr(self.vision, "blocks", None)
        depth = len(blocks) if blocks is not None else 0
        groups: dict[tuple[int, bool], dict] = {}
        for name, param in self.vision.named_parameters():
            if not param.requires_grad:
                continue
            lid = layer_id(name, depth) if blocks is not None else 0
            decays = param.ndim >= 2 and not name.endswith(("cls_token", "pos_embed"))
            group = groups.setdefault((lid, decays), {
                "params": [], "lr": ENCODER_LR * LAYER_DECAY ** (depth + 1 - lid),
                "weight_decay": FT_WEIGHT_DECAY if decays else 0.0, "encoder": True})
            group["params"].append(param)
        return [groups[k] for k in sorted(groups)]

    def schedule(self, opt: torch.optim.Optimizer, step: int, total: int) -> None:
        """Warm-up then cosine decay of the encoder's groups (the decoder's rate stays constant)."""
        enc = [g for g in opt.param_groups if g.get("encoder")]
        if not self._base:
            self._base = [g["lr"] for g in enc]
        for g, base in zip(enc, self._base):
            g["lr"] = base * _lr_factor(step, total)

    @torch.no_grad()
    def tokens(self, images: torch.Tensor, batch: int, device) -> torch.Tensor:
        self.eval()
        return torch.cat([self(images[i:i + batch].to(device)).cpu() for i in range(0, len(images), batch)])


class PatchDecoder(nn.Module):
    """(B, N, D) tokens on a g x g grid -> (B, K, sub * g, sub * g) logits.

    A 3x3 convolution over the token grid (``hidden`` channels, GELU), then a per-patch linear
    map to ``K * sub * sub`` logits, pixel-shuffled into each patch's cell. Each patch's logits
    see only its 3 x 3 token neighbourhood."""

    def __init__(self, dim: int, n_classes: int, sub: int, hidden: int = HIDDEN):
        super().__init__()
        self.k, self.sub = n_classes, sub
        self.mix = nn.Conv2d(dim, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, n_classes * sub * sub, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, d = tokens.shape
        g = math.isqrt(n)
        x = tokens.transpose(1, 2).reshape(b, d, g, g)
        return F.pixel_shuffle(self.out(F.gelu(self.mix(x))), self.sub)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - smoothed soft Dice, averaged over (image, class) pairs; logits / target (B, K, H, W)."""
    p = torch.sigmoid(logits).flatten(2)
    t = target.flatten(2)
    dice = (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)
    return 1 - dice.mean()


def positive_weights(targets: torch.Tensor) -> torch.Tensor:
    """(K,) BCE positive weight per class: sqrt(negative / positive pixel share), in [1, POS_WEIGHT_MAX].

    ``targets`` (I, K, R, R) float or uint8 (255 x the soft value); a class without positive pixels gets 1."""
    share = targets.float().mean(dim=(0, 2, 3)) / (255 if targets.dtype == torch.uint8 else 1)
    w = ((1 - share) / share.clamp(min=1e-6)).sqrt()
    return torch.where(share > 0, w.clamp(1.0, POS_WEIGHT_MAX), torch.ones_like(w))


def train_decoder(tokens: torch.Tensor, targets: torch.Tensor, seed: int, sub: int, *, steps: int = STEPS,
                  batch: int = BATCH, lr: float = LR, device: torch.device | str = "cpu",
                  encoder: FinetunedTokens | None = None) -> PatchDecoder:
    """Fit a :class:`PatchDecoder` with class-weighted BCE + soft Dice on (I, N, D) tokens and
    (I, K, R, R) targets (float, or uint8 holding 255 x the soft value).

    With ``encoder`` (:class:`FinetunedTokens`), ``tokens`` are the training *images* and the
    encoder is trained with the decoder (its own layer-wise decayed learning rates)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the layers' initialisation
    dim = encoder.dim if encoder is not None else tokens.shape[-1]
    head = PatchDecoder(dim, targets.shape[1], sub).to(device)
    pos_weight = positive_weights(targets).view(1, -1, 1, 1).to(device)
    groups = [{"params": list(head.parameters()), "lr": lr, "weight_decay": WEIGHT_DECAY}]
    if encoder is not None:
        groups += encoder.param_groups()
    opt = torch.optim.AdamW(groups)
    for step in range(steps):
        idx = torch.randint(len(tokens), (min(batch, len(tokens)),), generator=gen)
        x, t = tokens[idx].to(device), targets[idx].to(device).float()
        if targets.dtype == torch.uint8:
            t = t / 255
        if encoder is not None:
            encoder.schedule(opt, step, steps)
            x = encoder(x)
        logits = head(x)
        if logits.shape[-1] != t.shape[-1]:
            logits = F.interpolate(logits, size=t.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.binary_cross_entropy_with_logits(logits, t, pos_weight=pos_weight) + soft_dice_loss(logits, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.eval()


@torch.no_grad()
def predict_dice(head: PatchDecoder, tokens: torch.Tensor, truth: torch.Tensor, *,
                 device: torch.device | str = "cpu", chunk: int = 64) -> torch.Tensor:
    """(I, K) Dice of thresholded, upsampled predictions against (I, K, S, S) bool truth (NaN: both empty)."""
    stats = []
    for i in range(0, len(tokens), chunk):
        logits = head(tokens[i:i + chunk].to(device))
        logits = F.interpolate(logits, size=truth.shape[-2:], mode="bilinear", align_corners=False)
        stats.append(dice_stats(torch.sigmoid(logits).cpu() > THRESHOLD, truth[i:i + chunk]))
    return dice_from_stats(*(torch.cat(s) for s in zip(*stats)))


def large_classes(targets: torch.Tensor, classes: Sequence[str], sub: int) -> list[str]:
    """Classes whose median mask area, over the images where they are present, is at least
    ``LARGE_MIN_PATCHES`` patches; ``targets`` (I, K, sub * g, sub * g) soft masks of the training pool."""
    area = targets.float().sum(dim=(2, 3)) / (255 if targets.dtype == torch.uint8 else 1) / (sub * sub)
    out = []
    for k, name in enumerate(classes):
        present = area[:, k][area[:, k] > 0]
        if len(present) and float(present.median()) >= LARGE_MIN_PATCHES:
            out.append(name)
    return out


# ------------------------------------------------------------------------------ the task
def frozen_patch_tokens(model, tokenizer, train: Sequence[Sample], test: Sequence[Sample], cfg, classes, *, device):
    """Patch tokens of both splits from the model in eval mode (its mode restored afterwards):
    ``(train samples, test samples, train tokens (I, N, D), test tokens, grid)``, the samples in
    the order of their tokens (shared by the segmentation and detection tasks)."""
    was_training = model.training
    model.eval()
    try:
        train_ids, train_tok = patch_features(model, tokenizer, train, cfg, classes, device=device)
        test_ids, test_tok = patch_features(model, tokenizer, test, cfg, classes, device=device)
    finally:
        model.train(was_training)
    by_id = {s.id: s for s in [*train, *test]}
    return ([by_id[i] for i in train_ids], [by_id[i] for i in test_ids], train_tok, test_tok,
            math.isqrt(train_tok.shape[1]))


def evaluate_segmentation(model, tokenizer, train_samples: Sequence[Sample], test_samples: Sequence[Sample], cfg,
                          classes: Sequence[str], dataset_root: str | Path, *,
                          fractions: Sequence[float] = (0.01, 0.1, 1.0), seeds: Sequence[int] = (0,),
                          min_positives: int = 1, device: torch.device | str = "cpu",
                          encoder: str = "frozen") -> dict:
    """Dice per finding of a light decoder on frozen patch tokens (see the module docstring), or,
    with ``encoder="finetune"``, on the tokens of a copy of the vision tower trained with it.

    Args:
        model: a method with ``model.vision(images).tokens`` (B, N, D); left frozen.
        tokenizer: the model's tokenizer (the shared loader collates reports too).
        train_samples / test_samples: the training pool and the test split (samples without
            ``meta["mask"]`` are ignored).
        cfg: the run's config (preprocessing, ``eval.batch_size``).
        classes: the dataset's classes; those with a mask bit (not "No Finding") are scored.
        dataset_root: the folder that holds the manifest (mask paths are relative to it).
    Returns ``{"fractions": {"0.01": {"dice": mean over all scored classes, "sd", "dice_large": mean
    over ``large_classes``, "sd_large", "per_class", "n_train"}, ...}, "classes", "large_classes",
    "grid", "protocol"}``. Raises :class:`DenseTaskSkipped` when it does not apply.
    """
    from medvlp.data.synth.generator import CLASSES as MASK_CLASSES

    root = Path(dataset_root)
    scored = [c for c in classes if c in MASK_CLASSES and c != "No Finding"]
    train = [s for s in train_samples if s.meta.get("mask")]
    test = [s for s in test_samples if s.meta.get("mask")]
    if not scored or not train or not test:
        raise DenseTaskSkipped(f"segmentation needs masks (meta.mask) in both splits: {len(train)} training and "
                               f"{len(test)} test images have one, {len(scored)} classes have a mask bit")
    train, test, train_tok, test_tok, grid = frozen_patch_tokens(model, tokenizer, train, test, cfg, classes,
                                                                 device=device)
    pad = cfg.data.pad_to_square
    sub = min(cfg.model.vision.patch_size, MAX_SUB)
    train_t = (mask_targets(train, root, scored, sub * grid, pad) * 255).round().to(torch.uint8)  # 1 byte a pixel
    test_truth = mask_targets(test, root, scored, cfg.model.vision.image_size, pad, at_least=0.5)

    large = large_classes(train_t, scored, sub)
    if encoder not in ("frozen", "finetune"):
        raise ValueError(f"segmentation: encoder must be 'frozen' or 'finetune', got {encoder!r}")
    if encoder == "finetune":
        train_img, test_img = (_split_images(split, cfg, tokenizer, classes) for split in (train, test))

    runs = []
    for seed, subsets in training_subsets(train, scored, fractions, seeds, min_positives).items():
        run = {}
        for f, idx in subsets.items():
            idx_t = torch.as_tensor(idx, dtype=torch.long)
            if encoder == "frozen":
                x_train, x_test = standardise(train_tok[idx_t], test_tok)
                head = train_decoder(x_train, train_t[idx_t], seed, sub, device=device)
            else:
                flat = train_tok[idx_t].reshape(-1, train_tok.shape[-1])  # the frozen protocol's statistics
                std = flat.std(0).clamp(min=1e-6) if len(flat) > 1 else torch.ones(flat.shape[-1])
                tuned = FinetunedTokens(model.vision, flat.mean(0), std).to(device)
                head = train_decoder(train_img[idx_t], train_t[idx_t], seed, sub, device=device, encoder=tuned)
                x_test = tuned.tokens(test_img, cfg.eval.batch_size, device)
                del tuned
            res = dice_per_class(predict_dice(head, x_test, test_truth, device=device), scored)
            big = [res["per_class"][c] for c in large if c in res["per_class"]]
            run[fraction_key(f)] = {"dice": res["mean"], "per_class": res["per_class"], "n_train": len(idx),
                                    "dice_large": float(np.mean(big)) if big else None}
        runs.append(run)
    summary = summarise_seeds(runs, fractions, "dice")
    for f in fractions:  # the large-class mean beside the all-class mean, averaged over seeds the same way
        vals = [r[fraction_key(f)]["dice_large"] for r in runs if r[fraction_key(f)]["dice_large"] is not None]
        summary[fraction_key(f)]["dice_large"] = float(np.mean(vals)) if vals else None
        summary[fraction_key(f)]["sd_large"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return {
        "fractions": summary,
        "classes": scored, "large_classes": large, "grid": grid, "n_test": len(test), "n_train_pool": len(train),
        "seeds": list(seeds),
        "protocol": {"decoder": f"3x3 conv over the token grid ({HIDDEN}, GELU) -> per-patch linear to {sub}x{sub} "
                                f"sub-patch logits, bilinear upsampling",
                     "loss": f"BCE (pos_weight sqrt(neg/pos), <= {POS_WEIGHT_MAX:g}) + soft Dice", "steps": STEPS,
                     "batch": BATCH, "lr": LR, "threshold": THRESHOLD, "eval_size": cfg.model.vision.image_size,
                     "large_min_patches": LARGE_MIN_PATCHES, "encoder": encoder,
                     **({"encoder_lr": ENCODER_LR, "layer_decay": LAYER_DECAY} if encoder == "finetune" else {})},
    }


def _split_images(samples: Sequence[Sample], cfg, tokenizer, classes) -> torch.Tensor:
    """(I, C, H, W) preprocessed images of ``samples`` in order (all readable: they were encoded)."""
    from medvlp.data.loader import make_loader

    ids, images = [], []
    for batch in make_loader(samples, cfg, tokenizer, classes, batch_size=cfg.eval.batch_size):
        ids += list(batch.ids)
        images.append(batch.images)
    if ids != [s.id for s in samples]:
        raise EvaluationError("segmentation: the images loaded for fine-tuning differ from the encoded ones "
                              "(a file changed or became unreadable during the task)")
    return torch.cat(images)


__all__ = [
    "DenseTaskSkipped",
    "FinetunedTokens",
    "PatchDecoder",
    "evaluate_segmentation",
    "large_classes",
    "mask_targets",
    "patch_features",
    "positive_weights",
    "soft_dice_loss",
    "train_decoder",
]
