"""Localisation score: do a model's patch-level similarity maps point at the findings?

For every test image with a finding mask (SynthCXR writes one 16-bit PNG per image, bit k =
class k, see :func:`medvlp.data.synth.generator.decode_mask`; the manifest row's
``meta["mask"]`` names it) and every class that is POSITIVE for it and has mask pixels, the
heat map over the patch grid is the cosine between the model's projected patch embeddings
(``model.patch_embeddings(images) -> (B, N, D)``, L2-normalised, shared space) and the class's
*positive* prompt-ensemble embedding (the zero-shot prompts, :mod:`medvlp.eval.prompts`).

The mask is brought to patch resolution the way the image was (padded to square when the
preprocessing pads, then cut into the patch grid); a patch is *inside* when any mask pixel
falls in it (a dilation: thin lines and small nodules keep at least one patch). Metrics:

- **pointing game**: the map's maximum lies inside the mask. Ties are split: a pair scores the
  fraction of its maximal patches that are inside, so a constant map scores the mask's area
  fraction, which is also the chance level reported beside it (``chance.pointing_game``);
- **IoU@top-k%**: IoU between the top ``top_fraction`` of patches (k = 10 % by default,
  at least one patch; ties broken by a seeded random order) and the inside patches. Its
  chance level is the exact expectation for a uniformly random choice of those patches
  (hypergeometric), ``chance.iou_topk``. With masks from 2 % (a rib fracture) to ~60 % (edema)
  of the image, no k suits every class; compare models against each other and against chance.

Both are averaged per class and then over classes (``mean``), like zero-shot AUROC.

A second, word-level map (``words``) is reported beside it when the model has
``word_embeddings`` and the caller passes ``encode_words``: the token-patch attention that
GLoRIA-style local alignment trains. Each word token ``w`` of a positive prompt (the prompt's own
words: no template words, no special tokens) attends over the patches,
``a_w = softmax_n(WORD_SHARPEN * cos(w, p_n))`` (GLoRIA's gamma_1 = 4), and the class map is the
mean of ``a_w`` over each prompt's words, then over the class's prompts. Same pairs, metrics and
chance levels as the sentence map.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from medvlp.data.manifest import resolve_manifest
from medvlp.data.sample import POSITIVE, Sample
from medvlp.data.shard_access import mask_source
from medvlp.data.transforms import _pad_square
from medvlp.errors import DataError
from medvlp.eval.zeroshot import class_prompt_embeddings

TOP_FRACTION = 0.1
WORD_SHARPEN = 4.0

#: ``prompts -> one (n_words_i, D) tensor per prompt``: the L2-normalised embeddings of each
#: prompt's own word tokens (see :func:`medvlp.eval.runner.make_word_encoder`)
EncodeWords = Callable[[list[str]], list[torch.Tensor]]


class LocalizationSkipped(Exception):
    """The task does not apply (no patch embeddings, no masks); the message says why."""


def mask_to_patches(masks: np.ndarray, grid: int, pad_to_square: bool = True) -> torch.Tensor:
    """(K, H, W) bool masks -> (K, grid * grid) bool, row-major: True where any pixel is set."""
    if pad_to_square and masks.shape[1] != masks.shape[2]:
        masks = np.stack([_pad_square(m) for m in masks]) if len(masks) else masks
    x = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))[:, None]
    return F.adaptive_max_pool2d(x, grid).flatten(1) > 0


def pointing_game(heat: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """(M, N) maps and masks -> (M,) hit rate: the fraction of each map's maximal patches inside."""
    top = heat >= heat.max(dim=1, keepdim=True).values
    return (top & inside).sum(1).float() / top.sum(1).float()


def _top_patches(heat: torch.Tensor, top_fraction: float, seed: int) -> torch.Tensor:
    """(M, N) bool: each row's round(N * top_fraction) (at least 1) highest patches; equal
    scores are ordered by a seeded random permutation (a constant map picks at random)."""
    m, n = heat.shape
    k = max(1, round(n * top_fraction))
    gen = torch.Generator().manual_seed(seed)
    perm = torch.argsort(torch.rand(m, n, generator=gen), dim=1)
    order = torch.sort(heat.float().gather(1, perm), dim=1, descending=True, stable=True).indices[:, :k]
    chosen = torch.zeros(m, n, dtype=torch.bool)
    chosen.scatter_(1, perm.gather(1, order), True)
    return chosen


def topk_iou(heat: torch.Tensor, inside: torch.Tensor, top_fraction: float = TOP_FRACTION, seed: int = 0) -> torch.Tensor:
    """(M,) IoU between the top ``top_fraction`` patches of each map and its inside patches."""
    chosen = _top_patches(heat, top_fraction, seed)
    return (chosen & inside).sum(1).float() / (chosen | inside).sum(1).float()


def chance_iou(n: int, mask_sizes: torch.Tensor, top_fraction: float = TOP_FRACTION) -> torch.Tensor:
    """(M,) expected IoU of ``round(n * top_fraction)`` patches drawn uniformly against a mask of
    each size: the intersection j is hypergeometric, IoU = j / (k + m - j)."""
    k = max(1, round(n * top_fraction))
    m = mask_sizes.double()[:, None]
    j = torch.arange(k + 1, dtype=torch.float64)[None, :]

    def log_comb(a, b):
        ok = (b >= 0) & (b <= a)
        val = torch.lgamma(a + 1) - torch.lgamma(b + 1) - torch.lgamma((a - b).clamp(min=0) + 1)
        return torch.where(ok, val, torch.full_like(val, -math.inf))

    log_p = log_comb(m, j) + log_comb(n - m, k - j) - log_comb(torch.tensor(float(n)), torch.tensor(float(k)))
    return (log_p.exp() * j / (k + m - j)).sum(1)


def word_attention_maps(patches: torch.Tensor, words: torch.Tensor, weights: torch.Tensor,
                        sharpen: float = WORD_SHARPEN) -> torch.Tensor:
    """(B, N, D) patch and (T, D) word embeddings, (K, T) word weights -> (B, K, N) maps.

    Each word's attention over the patches is ``softmax_n(sharpen * <word, patch_n>)``; class k's
    map is ``sum_t weights[k, t] * attention_t`` (the weights of a class sum to 1, so a map is a
    distribution over the patches)."""
    attn = torch.softmax(sharpen * torch.einsum("bnd,td->btn", patches.float(), words.float()), dim=-1)
    return torch.einsum("btn,kt->bkn", attn, weights.float())


def class_word_weights(prompts_per_class: Sequence[Sequence[int]]) -> torch.Tensor:
    """Word counts of each class's prompts -> (K, T) weights over the concatenated words
    (class by class, prompt by prompt): each prompt of a class counts equally, each word of a
    prompt counts equally. A prompt without a word token counts as absent."""
    total = sum(sum(counts) for counts in prompts_per_class)
    weights = torch.zeros(len(prompts_per_class), total)
    start = 0
    for k, counts in enumerate(prompts_per_class):
        used = [c for c in counts if c > 0]
        for c in counts:
            if c > 0:
                weights[k, start:start + c] = 1.0 / (len(used) * c)
            start += c
    return weights


def _word_table(encode_words: EncodeWords, scored: Sequence[str], prompts: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, D) word embeddings of every class's positive prompts and their (K, T) weights."""
    words, counts = [], []
    for c in scored:
        per_prompt = encode_words(list(prompts[c]["positive"]))
        words += per_prompt
        counts.append([len(w) for w in per_prompt])
    weights = class_word_weights(counts)
    empty = [c for c, row in zip(scored, weights) if not bool(row.any())]
    if empty:
        raise LocalizationSkipped(f"no word token in the positive prompts of {', '.join(map(repr, empty))}")
    return torch.cat(words), weights


def _scores(heat: torch.Tensor, keep: torch.Tensor, inside: torch.Tensor, scored: Sequence[str],
            top_fraction: float) -> dict:
    h, m = heat[keep], inside[keep]
    class_index = keep.nonzero()[:, 1]
    return {"pointing_game": _summary(pointing_game(h, m), class_index, scored),
            "iou_topk": _summary(topk_iou(h, m, top_fraction), class_index, scored)}


def _read_masks(path, class_bits: Sequence[int]) -> np.ndarray:
    """(K, H, W) bool from a SynthCXR mask PNG (bit b of the 16-bit value = class with bit b).

    ``path``: a file path or a file-like object (:func:`medvlp.data.shard_access.mask_source`).
    A missing or unreadable file raises :class:`DataError` naming it."""
    try:
        with Image.open(path) as im:
            bits = np.asarray(im).astype(np.int64)
    except (OSError, ValueError) as exc:  # missing file, truncated or not an image
        raise DataError(f"mask {_mask_name(path)}: cannot be read ({exc}); regenerate the dataset (medvlp synth) "
                        "or drop the row's meta.mask so that the dense tasks skip it") from None
    if bits.ndim != 2:
        raise DataError(f"mask {_mask_name(path)}: expected a one-channel bit-mask PNG, got shape {bits.shape}")
    return ((bits[None] >> np.asarray(class_bits)[:, None, None]) & 1).astype(bool)


def _mask_name(path) -> str:
    return str(path) if isinstance(path, (str, Path)) else "(a shard member)"


def read_sample_masks(sample: Sample, root, class_bits: Sequence[int]) -> np.ndarray:
    """:func:`_read_masks` of ``sample``'s ``meta["mask"]`` (file or shard member); a
    :class:`DataError` names the sample."""
    try:
        return _read_masks(mask_source(sample, root), class_bits)
    except DataError as exc:
        raise DataError(f"sample {sample.id}: {exc}") from None


def _summary(values: torch.Tensor, class_index: torch.Tensor, classes: Sequence[str]) -> dict:
    per_class = {}
    for k, name in enumerate(classes):
        sel = class_index == k
        if bool(sel.any()):
            per_class[name] = float(values[sel].mean())
    return {"per_class": per_class, "mean": float(np.mean(list(per_class.values()))) if per_class else None}


@torch.no_grad()
def evaluate_localization(model, tokenizer, samples: Sequence[Sample], cfg, classes: Sequence[str],
                          encode_text: Callable[[list[str]], torch.Tensor], prompts: Mapping, dataset: str | Path, *,
                          device: torch.device | str = "cpu", top_fraction: float = TOP_FRACTION,
                          encode_words: EncodeWords | None = None) -> dict:
    """Pointing game and IoU@top-k% of ``model`` on ``samples`` (see the module docstring).

    With ``encode_words``, the word-level map's scores are added under ``"words"`` (or the
    reason it could not be made under ``"words_skipped"``).

    Raises :class:`LocalizationSkipped` when the model has no patch embeddings or no sample
    has a usable mask.
    """
    from medvlp.data.loader import make_loader
    from medvlp.data.synth.generator import CLASSES as MASK_CLASSES

    if not callable(getattr(model, "patch_embeddings", None)):
        raise LocalizationSkipped("the model exposes no patch_embeddings")
    scored = [c for c in classes if c in MASK_CLASSES]
    chosen = [s for s in samples if s.meta.get("mask") and any(s.labels.get(c) == POSITIVE for c in scored)]
    if not chosen:
        raise LocalizationSkipped("no test image has a finding mask (meta.mask) with a positive class")
    root = resolve_manifest(dataset).parent
    pos, _ = class_prompt_embeddings(encode_text, scored, {c: prompts[c] for c in scored})
    pos = pos.to(device)
    word_table, words_skipped = None, None
    if encode_words is not None:
        try:
            word_table = tuple(t.to(device) for t in _word_table(encode_words, scored, prompts))
        except LocalizationSkipped as exc:
            words_skipped = str(exc)

    heats, word_heats, ids = [], [], []
    for batch in make_loader(chosen, cfg, tokenizer, classes, batch_size=cfg.eval.batch_size):
        patches = model.patch_embeddings(batch.images.to(device))
        if patches is None:
            raise LocalizationSkipped(f"{type(model).__name__}.patch_embeddings returns None (no patch-level shared space)")
        heats.append(torch.einsum("bnd,kd->bkn", patches.float(), pos.float()).cpu())
        if word_table is not None:
            word_heats.append(word_attention_maps(patches, *word_table).cpu())
        ids += list(batch.ids)
    heat = torch.cat(heats)  # (I, K, N)
    n = heat.shape[-1]
    grid = math.isqrt(n)
    if grid * grid != n:
        raise LocalizationSkipped(f"patch_embeddings gave {n} patches, not a square grid")

    by_id = {s.id: s for s in chosen}
    bits = [MASK_CLASSES.index(c) for c in scored]
    inside = torch.stack([mask_to_patches(read_sample_masks(by_id[i], root, bits), grid,
                                          cfg.data.pad_to_square) for i in ids])  # (I, K, N)
    positive = torch.tensor([[by_id[i].labels.get(c) == POSITIVE for c in scored] for i in ids])
    keep = positive & inside.any(-1)  # (I, K): the (image, class) pairs scored
    if not bool(keep.any()):
        raise LocalizationSkipped("no positive class of a test image has mask pixels")
    m = inside[keep]
    class_index = keep.nonzero()[:, 1]
    out = {
        **_scores(heat, keep, inside, scored, top_fraction),
        "chance": {"pointing_game": _summary(m.float().mean(1), class_index, scored),
                   "iou_topk": _summary(chance_iou(n, m.sum(1), top_fraction), class_index, scored)},
        "n_pairs": {c: int((class_index == k).sum()) for k, c in enumerate(scored) if bool((class_index == k).any())},
        "n_images": len(ids), "grid": grid, "top_fraction": top_fraction,
        "heat_map": "cosine(patch embedding, positive prompt ensemble)",
    }
    if word_heats:
        out["words"] = {**_scores(torch.cat(word_heats), keep, inside, scored, top_fraction),
                        "heat_map": f"mean over the positive prompts' words of softmax_patches({WORD_SHARPEN:g} "
                                    "cosine(word embedding, patch embedding))"}
    elif words_skipped:
        out["words_skipped"] = words_skipped
    return out


__all__ = [
    "TOP_FRACTION",
    "WORD_SHARPEN",
    "EncodeWords",
    "LocalizationSkipped",
    "chance_iou",
    "class_word_weights",
    "evaluate_localization",
    "mask_to_patches",
    "pointing_game",
    "topk_iou",
    "word_attention_maps",
]
