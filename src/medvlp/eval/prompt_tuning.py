"""Prompt tuning: a downstream mode that trains only a method's prompt context vectors (CoOp).

For a method with learned prompts (``prompt_learner`` holding the context ``ctx`` and
``class_text_embeddings(classes) -> (pos (K, E), neg (K, E))``, e.g. UMCL), on the same nested,
stratified label fractions as the linear probe (the probe's split files
``splits/probe_seed{seed}.json`` are read when present, else made by the same function with the
same seeds and written), per (seed, fraction):

1. every parameter but the context is frozen (``requires_grad`` off, not in the optimizer);
2. the context is trained full-batch for ``steps`` AdamW steps on frozen image embeddings of the
   fraction, with the zero-shot score as the classifier: BCE on
   ``logit_scale * (v . pos_k - v . neg_k)`` over known (positive / negative) labels;
3. test AUROC of that score is recorded (uncertain / missing labels masked), and the
   pre-trained context is restored, so the model leaves evaluation as it came.

Results: mean ± sd over seeds per fraction, as the linear probe reports them.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medvlp.data.sample import NEGATIVE, POSITIVE
from medvlp.errors import EvaluationError
from medvlp.eval.linear_probe import fraction_key, probe_split_indices
from medvlp.eval.metrics import auroc_per_class
from medvlp.eval.zeroshot import margins_from_embeddings


def supports_prompt_tuning(model: nn.Module) -> bool:
    return hasattr(model, "class_text_embeddings") and isinstance(
        getattr(getattr(model, "prompt_learner", None), "ctx", None), nn.Parameter)


@contextlib.contextmanager
def only_context_trains(model: nn.Module) -> Iterator[nn.Parameter]:
    """Freeze every parameter but ``model.prompt_learner.ctx`` (restored on exit); yields ctx."""
    ctx = model.prompt_learner.ctx
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(p is ctx)
        yield ctx
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def prompt_bce(model: nn.Module, image_emb: torch.Tensor, codes: torch.Tensor, classes: Sequence[str],
               logit_scale: float) -> torch.Tensor:
    """Mean BCE over known labels of the learned-prompt zero-shot margin (image_emb (N, E) normalised)."""
    pos, neg = model.class_text_embeddings(list(classes))
    margin = logit_scale * (image_emb.float() @ (pos - neg).float().t())
    valid = (codes == POSITIVE) | (codes == NEGATIVE)
    per = F.binary_cross_entropy_with_logits(margin, (codes == POSITIVE).float(), reduction="none")
    return (per * valid).sum() / valid.sum().clamp(min=1)


def tune_prompts(model: nn.Module, image_emb: torch.Tensor, codes: torch.Tensor, classes: Sequence[str], *,
                 steps: int, lr: float, logit_scale: float) -> list[float]:
    """Train only ``model.prompt_learner.ctx`` in place (see the module docstring); returns the losses.
    The model's train/eval mode is the caller's (evaluation: eval, so dropout is off)."""
    if not supports_prompt_tuning(model):
        raise EvaluationError(f"{type(model).__name__} has no learned prompts (prompt_learner.ctx + class_text_embeddings)")
    device = model.prompt_learner.ctx.device
    image_emb, codes = image_emb.to(device), codes.to(device)
    losses = []
    with only_context_trains(model) as ctx, torch.enable_grad():
        opt = torch.optim.AdamW([ctx], lr=lr, weight_decay=0.0)
        for _ in range(steps):
            loss = prompt_bce(model, image_emb, codes, classes, logit_scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        ctx.grad = None
    return losses


def evaluate_prompt_tuning(model: nn.Module, train_emb: torch.Tensor, train_labels: torch.Tensor,
                           train_ids: Sequence[str], test_emb: torch.Tensor, test_labels: torch.Tensor,
                           classes: Sequence[str], fractions: Sequence[float], min_positives: int,
                           seeds: int | Sequence[int], out_dir: str | Path | None, *, steps: int, lr: float,
                           logit_scale: float) -> dict:
    """Prompt-tuned zero-shot AUROC per label fraction, mean ± sd over seeds (see the module docstring).

    ``classes`` are the dataset's label columns; those without a learned prompt are not scored.
    """
    known = set(model.learned_prompt_classes)
    common = [c for c in classes if c in known]
    if not common:
        raise EvaluationError(f"the model's learned prompts cover none of the dataset's classes {list(classes)}")
    cols = [list(classes).index(c) for c in common]
    train_codes = train_labels.long()
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    initial = model.prompt_learner.ctx.detach().clone()
    acc: dict[float, dict[str, list]] = {f: {"mean": [], "per_class": [], "n": [], "loss": []} for f in fractions}
    split_files: list[str] = []
    try:
        for seed in seed_list:
            indices, path = probe_split_indices(list(train_ids), train_codes.numpy(), fractions, min_positives, seed, out_dir)
            if path:
                split_files.append(path)
            for frac, idx in indices.items():
                with torch.no_grad():
                    model.prompt_learner.ctx.copy_(initial)
                torch.manual_seed(seed)
                index = torch.as_tensor(idx, dtype=torch.long)
                losses = tune_prompts(model, train_emb[index], train_codes[index][:, cols], common, steps=steps,
                                      lr=lr, logit_scale=logit_scale)
                with torch.no_grad():
                    pos, neg = model.class_text_embeddings(common)
                auroc = auroc_per_class(margins_from_embeddings(test_emb, pos, neg, logit_scale),
                                        test_labels[:, cols], common)
                entry = acc[frac]
                entry["mean"].append(auroc["mean"])
                entry["per_class"].append([auroc["per_class"][c] for c in common])
                entry["n"].append(len(idx))
                entry["loss"].append([losses[0], losses[-1]] if losses else [])
    finally:
        with torch.no_grad():
            model.prompt_learner.ctx.copy_(initial)  # the model leaves as it came
    out = {}
    for frac, entry in acc.items():
        means = np.asarray(entry["mean"], dtype=np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            per_class = np.nanmean(np.asarray(entry["per_class"], dtype=np.float64), axis=0)
        out[fraction_key(frac)] = {
            "fraction": float(frac), "mean": float(np.mean(means)),
            "sd": float(np.std(means, ddof=1)) if len(means) > 1 else 0.0, "per_seed": means.tolist(),
            "per_class": {c: float(v) for c, v in zip(common, per_class)}, "n_train": entry["n"],
            "loss_first_last": entry["loss"],
        }
    return {"trained": "prompt context vectors only (prompt_learner.ctx)", "steps": steps, "lr": lr,
            "logit_scale": float(logit_scale), "seeds": seed_list, "split_files": split_files,
            "not_scored": [c for c in classes if c not in known], "fractions": out}


__all__ = ["evaluate_prompt_tuning", "only_context_trains", "prompt_bce", "supports_prompt_tuning", "tune_prompts"]
