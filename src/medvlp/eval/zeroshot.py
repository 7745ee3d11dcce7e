"""Zero-shot multi-label classification with positive / negative prompt ensembles.

For each class the positive prompts are embedded, averaged (prompt ensemble) and
re-normalised; likewise the negative prompts. An image's score for the class is the
softmax over the pair ``[image . pos, image . neg] * logit_scale``, i.e. the
probability that the finding is present::

    P(positive) = sigmoid(logit_scale * (image . pos - image . neg))

All prompts of all classes are encoded in one call to ``encode_text`` and the class
means are formed with a scatter-add, so no Python loop runs over classes or samples.

Methods with learned prompts (UMCL) give the class embeddings directly
(``class_text_embeddings(classes) -> (pos, neg)``); :func:`evaluate_zero_shot_embeddings`
scores those the same way (the runner reports them as ``zeroshot_learned``).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from medvlp.errors import EvaluationError
from medvlp.eval.metrics import auroc_per_class, roc_curves

EncodeText = Callable[[list[str]], torch.Tensor]
DEFAULT_LOGIT_SCALE = 100.0


def class_prompt_embeddings(
    encode_text: EncodeText, classes: Sequence[str], prompts: Mapping[str, Mapping[str, Sequence[str]]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ensembled, re-normalised prompt embeddings: (pos (K, E), neg (K, E))."""
    missing = [c for c in classes if c not in prompts]
    if missing:
        raise EvaluationError(f"no zero-shot prompts for class(es) {', '.join(map(repr, missing))}")
    texts: list[str] = []
    slot: list[int] = []  # row of the (2K, E) table: class k positive -> k, negative -> K + k
    num_classes = len(classes)
    for k, name in enumerate(classes):
        for offset, polarity in ((0, "positive"), (num_classes, "negative")):
            entries = list(prompts[name][polarity])
            if not entries:
                raise EvaluationError(f"class {name!r} has no {polarity} zero-shot prompts")
            texts.extend(entries)
            slot.extend([k + offset] * len(entries))
    emb = encode_text(texts).float()
    if emb.ndim != 2 or emb.shape[0] != len(texts):
        raise EvaluationError(f"encode_text returned shape {tuple(emb.shape)} for {len(texts)} prompts; expected (M, E)")
    index = torch.tensor(slot, device=emb.device)
    sums = torch.zeros(2 * num_classes, emb.shape[1], device=emb.device, dtype=emb.dtype).index_add_(0, index, emb)
    means = F.normalize(sums, dim=-1)  # the mean's direction equals the sum's
    return means[:num_classes], means[num_classes:]


@torch.no_grad()
def zero_shot_margins(
    image_emb: torch.Tensor,
    encode_text: EncodeText,
    classes: Sequence[str],
    prompts: Mapping[str, Mapping[str, Sequence[str]]],
    logit_scale: float = DEFAULT_LOGIT_SCALE,
) -> torch.Tensor:
    """(N, K) logit margins ``logit_scale * (image . pos - image . neg)`` (float64).

    The softmax over the pair is ``sigmoid(margin)``, a monotone map: ranking metrics are
    computed on the margin because the probability saturates to exactly 1.0 in floating
    point for margins above ~37, which would create spurious ties.
    """
    pos, neg = class_prompt_embeddings(encode_text, classes, prompts)
    return margins_from_embeddings(image_emb, pos, neg, logit_scale)


def margins_from_embeddings(image_emb: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                            logit_scale: float = DEFAULT_LOGIT_SCALE) -> torch.Tensor:
    """(N, K) margins ``logit_scale * (image . pos_k - image . neg_k)`` (float64) from class
    embeddings pos, neg (K, E): hand-written prompt ensembles or a method's learned prompts."""
    pos, neg = pos.detach().float(), neg.detach().float()
    image_emb = image_emb.detach().float().to(pos.device)
    if image_emb.ndim != 2 or image_emb.shape[1] != pos.shape[1] or pos.shape != neg.shape:
        raise EvaluationError(
            f"image embeddings {tuple(image_emb.shape)} and prompt embeddings {tuple(pos.shape)} / "
            f"{tuple(neg.shape)} do not match"
        )
    return logit_scale * (image_emb.double() @ (pos - neg).double().T)


def zero_shot_scores(
    image_emb: torch.Tensor,
    encode_text: EncodeText,
    classes: Sequence[str],
    prompts: Mapping[str, Mapping[str, Sequence[str]]],
    logit_scale: float = DEFAULT_LOGIT_SCALE,
) -> torch.Tensor:
    """P(finding present) per image and class.

    Args:
        image_emb: (N, E) L2-normalised image embeddings.
        encode_text: maps a list of M strings to (M, E) L2-normalised embeddings.
        classes: the K class names (keys of ``prompts``).
        prompts: ``{class: {"positive": [...], "negative": [...]}}``.
        logit_scale: temperature inverse (CLIP's exp(logit_scale), clamped to 100).
    Returns:
        (N, K) float tensor in [0, 1]: softmax over ``[s_pos, s_neg]`` taken at the
        positive entry, which equals ``sigmoid(s_pos - s_neg)``.
    """
    margins = zero_shot_margins(image_emb, encode_text, classes, prompts, logit_scale)
    return torch.sigmoid(margins).float()


def evaluate_zero_shot(
    image_emb: torch.Tensor,
    encode_text: EncodeText,
    labels: torch.Tensor,
    classes: Sequence[str],
    prompts: Mapping[str, Mapping[str, Sequence[str]]],
    logit_scale: float = DEFAULT_LOGIT_SCALE,
) -> dict:
    """Zero-shot AUROC per class and mean (uncertain / missing labels masked out).

    Returns :func:`~medvlp.eval.metrics.auroc_per_class`'s dict plus ``"roc"`` (curve
    points per class, for the report's plot) and ``"logit_scale"``.
    """
    margins = zero_shot_margins(image_emb, encode_text, classes, prompts, logit_scale)
    return _auroc_result(margins, labels, classes, logit_scale)


def evaluate_zero_shot_embeddings(image_emb: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                                  labels: torch.Tensor, classes: Sequence[str],
                                  logit_scale: float = DEFAULT_LOGIT_SCALE) -> dict:
    """:func:`evaluate_zero_shot` with the class embeddings given: (pos (K, E), neg (K, E)),
    e.g. the learned prompts of a method's ``class_text_embeddings(classes)``."""
    margins = margins_from_embeddings(image_emb, pos, neg, logit_scale)
    return _auroc_result(margins, labels, classes, logit_scale)


def _auroc_result(margins: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], logit_scale: float) -> dict:
    result = auroc_per_class(margins, labels, classes)  # same ranking as sigmoid(margins)
    result["roc"] = roc_curves(margins, labels, classes)
    result["logit_scale"] = float(logit_scale)
    return result
