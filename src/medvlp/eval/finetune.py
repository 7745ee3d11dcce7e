"""Full fine-tuning of the image encoder for multi-label classification, with layer-wise lr decay.

Protocol (fixed; the constants below are part of it):

- **Encoder**: a deep copy of ``model.vision`` (the evaluated model is never modified), its
  pooled output (``[CLS]`` after the final norm for the medvlp ViT) feeding a new linear head
  with one logit per class (zero-initialised bias and N(0, 0.01) weights).
- **Layer-wise learning-rate decay** (BEiT / MAE fine-tuning): with ``L`` = number of ViT
  blocks, every parameter gets a layer id: the patch embedding, ``cls_token`` and position
  embedding 0, block ``i`` gets ``i + 1``, everything after the blocks (final norm) and the head
  ``L + 1``. Its learning rate is ``lr * decay ** (L + 1 - layer_id)``: the head trains at
  ``lr``, the last block at ``lr * decay``, the patch embedding at ``lr * decay ** (L + 1)``.
  An encoder without ``blocks`` gets ``lr * decay`` everywhere (the head ``lr``).
  Weight decay ``WEIGHT_DECAY`` applies to matrices only (not to biases, norms, tokens).
- **Optimiser**: AdamW, ``BATCH_SIZE`` images per step, ``epochs`` passes over the training
  fraction but at least ``MIN_STEPS`` steps (1 % fractions hold few images), linear warmup over
  the first ``WARMUP_FRACTION`` of the steps then cosine decay to 0; no augmentation.
- **Loss**: :func:`medvlp.methods.supervised.masked_bce` (uncertain / missing labels masked).
- **Data**: the linear probe's own subsets: read from its split files in ``out_dir``
  (``splits/probe_seed<seed>.json``), or made with the probe's
  :func:`medvlp.eval.linear_probe.probe_split_indices` (same ``min_positives`` and seed) and
  written there, so fine-tuning and probing see identical subsets.
- **Metric**: test AUROC per class (:func:`medvlp.eval.metrics.auroc_per_class`) and its mean,
  mean ± sd (ddof=1) over seeds per fraction.
"""
from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medvlp.data.sample import Sample
from medvlp.errors import DataError, EvaluationError
from medvlp.eval.linear_probe import fraction_key, probe_split_indices
from medvlp.eval.metrics import auroc_per_class
from medvlp.methods.supervised import masked_bce

LR = 1e-3
LAYER_DECAY = 0.75
WEIGHT_DECAY = 0.05
BATCH_SIZE = 32
EPOCHS = 10
MIN_STEPS = 50
WARMUP_FRACTION = 0.1


class FinetuneClassifier(nn.Module):
    """A copied image encoder + a linear head on its pooled output."""

    def __init__(self, encoder: nn.Module, width: int, n_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(width, n_classes)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images).pooled)


def layer_id(name: str, depth: int) -> int:
    """Layer id of an encoder parameter (module docstring): 0 stem, i + 1 block i, depth + 1 the rest."""
    if name.startswith(("patch_embed", "cls_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def llrd_param_groups(classifier: FinetuneClassifier, lr: float, decay: float = LAYER_DECAY,
                      weight_decay: float = WEIGHT_DECAY) -> list[dict]:
    """AdamW parameter groups with layer-wise decayed learning rates (module docstring).

    Each group holds ``params``, ``lr``, ``weight_decay`` and, for inspection, ``layer_id``
    and ``names``; one group per (layer id, decayed or not).
    """
    blocks = getattr(classifier.encoder, "blocks", None)
    depth = len(blocks) if blocks is not None else 0
    groups: dict[tuple[int, bool], dict] = {}
    named = [(f"encoder.{n}", n, p) for n, p in classifier.encoder.named_parameters()]
    named += [(f"head.{n}", None, p) for n, p in classifier.head.named_parameters()]
    for full, enc_name, param in named:
        if not param.requires_grad:
            continue
        if enc_name is None:
            lid = depth + 1
        else:
            lid = layer_id(enc_name, depth) if blocks is not None else 0
        # matrices decay; biases, norm scales and learned tokens do not
        decays = param.ndim >= 2 and not full.endswith(("cls_token", "pos_embed"))
        scale = decay ** (depth + 1 - lid) if blocks is not None else (1.0 if enc_name is None else decay)
        group = groups.setdefault((lid, decays), {"params": [], "names": [], "layer_id": lid, "lr": lr * scale,
                                                  "weight_decay": weight_decay if decays else 0.0})
        group["params"].append(param)
        group["names"].append(full)
    return [groups[k] for k in sorted(groups)]


def _load_split(samples: Sequence[Sample], cfg, tokenizer, classes: Sequence[str]):
    """(ids, images (N, C, H, W), label codes (N, K)) of a split, preprocessed once."""
    from medvlp.data.loader import make_loader

    ids, images, labels = [], [], []
    for batch in make_loader(samples, cfg, tokenizer, classes, batch_size=cfg.eval.batch_size):
        ids += list(batch.ids)
        images.append(batch.images)
        labels.append(batch.labels)
    if not ids:
        raise DataError("finetune: the loader produced no images (is the split empty?)")
    return ids, torch.cat(images), torch.cat(labels).long()


def _lr_factor(step: int, total: int) -> float:
    warmup = max(1, int(total * WARMUP_FRACTION))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def finetune_once(encoder: nn.Module, images: torch.Tensor, codes: torch.Tensor, n_classes: int, *, epochs: int,
                  seed: int, lr: float = LR, decay: float = LAYER_DECAY, device="cpu") -> FinetuneClassifier:
    """Fine-tune a deep copy of ``encoder`` + a new head on (images, codes); returns it in eval mode."""
    torch.manual_seed(seed)
    clf = FinetuneClassifier(copy.deepcopy(encoder), encoder.width, n_classes).to(device).train()
    groups = llrd_param_groups(clf, lr, decay)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups])
    base = [g["lr"] for g in opt.param_groups]
    n = len(images)
    total = max(MIN_STEPS, epochs * -(-n // BATCH_SIZE))
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for step in range(total):
        if len(order) < min(BATCH_SIZE, n):
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        idx, order = order[:BATCH_SIZE], order[BATCH_SIZE:]
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * _lr_factor(step, total)
        loss = masked_bce(clf(images[idx].to(device)), codes[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return clf.eval()


@torch.no_grad()
def _predict(clf: FinetuneClassifier, images: torch.Tensor, batch_size: int, device) -> np.ndarray:
    return torch.cat([clf(images[s:s + batch_size].to(device)).float().cpu()
                      for s in range(0, len(images), batch_size)]).numpy()


def evaluate_finetune(model, train_samples: Sequence[Sample], test_samples: Sequence[Sample], cfg,
                      classes: Sequence[str], *, fractions: Sequence[float] = (0.01, 0.1, 1.0), epochs: int = EPOCHS,
                      seeds: Sequence[int] = (0,), device: torch.device | str = "cpu", tokenizer=None,
                      lr: float = LR, layer_decay: float = LAYER_DECAY, out_dir: str | Path | None = None) -> dict:
    """Fine-tuned test AUROC per label fraction, mean ± sd over seeds (module docstring).

    Args:
        model: a method with a ``vision`` tower returning ``.pooled`` and having ``.width``.
        train_samples: the training pool (the linear probe's ``eval.probe_train_split``).
        test_samples: the test split (subject-disjoint from the pool).
        cfg: experiment config (preprocessing, ``eval.batch_size``, ``eval.min_positives``).
        classes: the K label columns.
        tokenizer: only for the loader's report tokenisation; the model's tokenizer, or None
            (then a throwaway tokenizer is trained on a fixed sentence).
        out_dir: the evaluation folder: the label fractions are read from the linear probe's
            split files there (``splits/probe_seed<seed>.json``), or written there when absent.
    Returns ``{"protocol", "seeds", "epochs", "lr", "layer_decay", "fractions": {key: {"fraction",
    "mean", "sd", "per_seed", "per_class", "n_train"}}}``, shaped like the linear probe's result.
    """
    vision = getattr(model, "vision", None)
    if not isinstance(vision, nn.Module) or not hasattr(vision, "width"):
        raise EvaluationError(f"finetune: {type(model).__name__} has no image encoder at .vision (with .width) "
                              "to fine-tune")
    seeds = [int(s) for s in seeds]
    if not seeds or epochs < 1:
        raise EvaluationError(f"finetune: need at least one seed and one epoch, got seeds={seeds}, epochs={epochs}")
    if tokenizer is None:
        from medvlp.data.tokenize import train_wordpiece

        tokenizer = train_wordpiece(["no acute cardiopulmonary process."], 64)
    train_ids, train_images, train_codes = _load_split(train_samples, cfg, tokenizer, classes)
    _, test_images, test_codes = _load_split(test_samples, cfg, tokenizer, classes)

    acc: dict[float, dict[str, list]] = {f: {"mean": [], "per_class": [], "n": []} for f in fractions}
    for seed in seeds:
        indices, _ = probe_split_indices(list(train_ids), train_codes.numpy(), fractions, cfg.eval.min_positives, seed,
                                         out_dir)
        for frac, idx in indices.items():
            idx_t = torch.as_tensor(idx, dtype=torch.long)
            clf = finetune_once(vision, train_images[idx_t], train_codes[idx_t], len(classes), epochs=epochs,
                                seed=seed, lr=lr, decay=layer_decay, device=device)
            auroc = auroc_per_class(_predict(clf, test_images, cfg.eval.batch_size, device), test_codes.numpy(),
                                    classes)
            acc[frac]["mean"].append(auroc["mean"])
            acc[frac]["per_class"].append([auroc["per_class"][c] for c in classes])
            acc[frac]["n"].append(len(idx))

    out = {}
    for frac, a in acc.items():
        means = np.asarray(a["mean"], dtype=np.float64)
        with warnings.catch_warnings():  # a class undefined on the test set stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            per_class = np.nanmean(np.asarray(a["per_class"], dtype=np.float64), axis=0)
        out[fraction_key(frac)] = {
            "fraction": float(frac), "mean": float(means.mean()),
            "sd": float(means.std(ddof=1)) if len(means) > 1 else 0.0, "per_seed": means.tolist(),
            "per_class": {c: float(v) for c, v in zip(classes, per_class)}, "n_train": a["n"],
        }
    return {
        "protocol": f"full fine-tuning, LLRD {layer_decay}, AdamW lr {lr}, batch {BATCH_SIZE}, "
                    f"{epochs} epochs (>= {MIN_STEPS} steps), warmup + cosine, masked BCE",
        "seeds": seeds, "epochs": epochs, "lr": lr, "layer_decay": layer_decay,
        "min_positives": int(cfg.eval.min_positives), "fractions": out,
    }


__all__ = ["FinetuneClassifier", "evaluate_finetune", "finetune_once", "layer_id", "llrd_param_groups"]
