"""Evaluation orchestration used by ``medvlp evaluate`` and the demo.

:func:`evaluate_models` reads a prepared dataset, checks that the test subjects are
disjoint from pre-training (and from the probe's training split), embeds each split
once per model, runs the tasks of ``cfg.eval.tasks`` (zeroshot, retrieval, retrieval_itm,
linear_probe, localization, prompt_tuning, vqa, finetune, segmentation, detection)
and writes the report (:mod:`medvlp.eval.report`).

A model is a :class:`~medvlp.methods.base.Method` providing ``encode_image(images)``
and ``encode_text(input_ids, attention_mask)`` (L2-normalised, shared space),
``image_features(images)`` (un-normalised encoder features for the linear probe; when
absent the probe falls back to ``encode_image`` and says so in the results) and a
``logit_scale`` parameter holding log(1/tau) (zero-shot uses its exp, clamped to 100).
An image-only model (``supports_text = False``) gets only the image tasks; the skipped
ones are listed in its ``meta.skipped_tasks``. A model with a classification head
(``head_classes`` and ``classify_features(features) -> logits``) also gets the head's own
test AUROC as ``supervised_head``, on the classes the head and the dataset share.
A model with learned prompts (``class_text_embeddings(classes) -> (pos, neg)``, e.g. UMCL)
gets ``zeroshot_learned`` beside the hand-written ``zeroshot``, and the ``prompt_tuning``
task (:mod:`medvlp.eval.prompt_tuning`; other models list it as skipped).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from medvlp.data.manifest import read_info, read_manifest
from medvlp.data.sample import Sample, hash_subject
from medvlp.errors import DataError, EvaluationError, SplitFileError
from medvlp.eval.linear_probe import evaluate_linear_probe
from medvlp.eval.localization import LocalizationSkipped, evaluate_localization
from medvlp.eval.metrics import auroc_per_class
from medvlp.eval.prompt_tuning import evaluate_prompt_tuning, supports_prompt_tuning
from medvlp.eval.prompts import load_prompts
from medvlp.eval.report import write_report
from medvlp.eval.retrieval import evaluate_retrieval
from medvlp.eval.retrieval_itm import RetrievalItmSkipped, evaluate_retrieval_itm, has_shared_space
from medvlp.eval.zeroshot import (
    DEFAULT_LOGIT_SCALE,
    evaluate_zero_shot,
    evaluate_zero_shot_embeddings,
)

log = logging.getLogger(__name__)

MAX_ZERO_SHOT_SCALE = 100.0
TASKS = ("zeroshot", "retrieval", "retrieval_itm", "linear_probe", "localization", "prompt_tuning", "vqa", "finetune",
         "segmentation", "detection")
#: tasks that train on the probe's training split (``eval.probe_train_split``)
POOL_TASKS = ("linear_probe", "prompt_tuning", "vqa", "finetune", "segmentation", "detection")


def _make_loader(samples: Sequence[Sample], cfg, tokenizer, classes: Sequence[str], batch_size: int) -> Iterable:
    """The in-order evaluation loader (imported lazily: data loading is optional here)."""
    from medvlp.data.loader import make_loader

    return make_loader(samples, cfg, tokenizer, classes, train=False, batch_size=batch_size)


def _encode_texts(tokenizer, texts: list[str], max_length: int) -> dict:
    from medvlp.data.tokenize import encode_texts

    return encode_texts(tokenizer, texts, max_length)


@dataclass
class SplitEmbeddings:
    """Everything the tasks need from one split, row-aligned (N rows)."""

    ids: list[str]
    subject_ids: list[str]
    texts: list[str]
    labels: torch.Tensor  # (N, K) label codes
    image_emb: Optional[torch.Tensor] = None  # (N, E) normalised
    text_emb: Optional[torch.Tensor] = None  # (N, E) normalised
    features: Optional[torch.Tensor] = None  # (N, D) encoder features


def check_subject_overlap(test: Sequence[Sample], seen: Optional[set[str]], *, test_split: str, seen_what: str,
                          fix: str, limit: int = 5, hashed: bool = False) -> None:
    """Raise :class:`EvaluationError` when a test subject is among ``seen`` (SHA-256
    hashes of subject ids when ``hashed``, as checkpoints store them)."""
    if not seen:
        return
    seen = set(seen)
    key = hash_subject if hashed else (lambda sid: sid)
    overlap = sorted({s.subject_id for s in test if key(s.subject_id) in seen})
    if overlap:
        n_test = len({s.subject_id for s in test})
        raise EvaluationError(
            f"{len(overlap)} of {n_test} subjects of the test split {test_split!r} also appear in {seen_what}, "
            f"e.g. {', '.join(overlap[:limit])}. Scores on subjects the model has seen are inflated, so "
            f"evaluation refuses to run. Fix: {fix}"
        )


@torch.no_grad()
def embed_split(model: nn.Module, tokenizer, samples: Sequence[Sample], cfg, classes: Sequence[str], *,
                device: torch.device | str = "cpu", images: bool = True, texts: bool = False,
                features: bool = False, progress: bool = True, desc: str = "embedding") -> SplitEmbeddings:
    """Run the model over one split in eval mode; returns row-aligned embeddings.

    Samples whose image the loader could not read are absent from the result (the
    loader reports them); ids tell which rows survived.
    """
    feature_fn = getattr(model, "image_features", None) if features else None
    ids: list[str] = []
    subject_ids: list[str] = []
    all_texts: list[str] = []
    labels, img_out, txt_out, feat_out = [], [], [], []
    loader = _make_loader(samples, cfg, tokenizer, classes, cfg.eval.batch_size)
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
        pixels = batch.images.to(device)
        ids += list(batch.ids)
        subject_ids += list(batch.subject_ids)
        all_texts += list(batch.texts)
        labels.append(batch.labels.cpu())
        if images or (features and feature_fn is None):
            img_out.append(model.encode_image(pixels).float().cpu())
        if texts:
            txt_out.append(model.encode_text(batch.input_ids.to(device), batch.attention_mask.to(device)).float().cpu())
        if feature_fn is not None:
            feat_out.append(feature_fn(pixels).float().cpu())
    if not ids:
        raise DataError(f"{desc}: the loader produced no samples (is the split empty?)")
    image_emb = torch.cat(img_out) if img_out else None
    return SplitEmbeddings(
        ids=ids,
        subject_ids=subject_ids,
        texts=all_texts,
        labels=torch.cat(labels).long(),
        image_emb=image_emb if images else None,
        text_emb=torch.cat(txt_out) if txt_out else None,
        features=torch.cat(feat_out) if feat_out else (image_emb if features else None),
    )


def make_text_encoder(model: nn.Module, tokenizer, cfg, device: torch.device | str = "cpu") -> Callable[[list[str]], torch.Tensor]:
    """``prompts -> (M, E)`` normalised embeddings, tokenised like the training reports;
    each prompt is first formatted with ``cfg.eval.prompt_template`` (e.g. ``"IMPRESSION: {}"``
    puts it in the section layout the reports were trained with)."""

    @torch.no_grad()
    def encode(texts: list[str]) -> torch.Tensor:
        texts = [cfg.eval.prompt_template.format(t) for t in texts]
        out = []
        step = max(1, cfg.eval.batch_size)
        for start in range(0, len(texts), step):
            enc = _encode_texts(tokenizer, list(texts[start : start + step]), cfg.model.text.max_length)
            emb = model.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device))
            out.append(emb.float().cpu())
        return torch.cat(out)

    return encode


def _word_count(tokenizer, text: str, max_length: int) -> int:
    if not text.strip():
        return 0
    word_ids = _encode_texts(tokenizer, [text], max_length)["word_ids"]
    return int(word_ids.max()) + 1


def make_word_encoder(model: nn.Module, tokenizer, cfg, device: torch.device | str = "cpu") -> Callable[[list[str]], list[torch.Tensor]]:
    """``prompts -> [(n_words_i, D) normalised word-token embeddings]`` for the word-level
    localisation map: each prompt is formatted with ``cfg.eval.prompt_template`` and encoded in
    that context, like :func:`make_text_encoder`, but only the tokens of the prompt's own words
    are kept (not the template's words, [CLS], [SEP] or padding)."""
    template = cfg.eval.prompt_template
    max_length = cfg.model.text.max_length
    skip = _word_count(tokenizer, template.split("{}")[0], max_length)

    @torch.no_grad()
    def encode(texts: list[str]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        step = max(1, cfg.eval.batch_size)
        for start in range(0, len(texts), step):
            chunk = list(texts[start : start + step])
            enc = _encode_texts(tokenizer, [template.format(t) for t in chunk], max_length)
            emb = model.word_embeddings(enc["input_ids"].to(device), enc["attention_mask"].to(device))
            if emb is None:
                raise LocalizationSkipped(f"{type(model).__name__}.word_embeddings returns None (no word-level shared space)")
            emb = emb.float().cpu()
            # each prompt's own word count, from one tokenisation of the bare prompts
            counts = _encode_texts(tokenizer, chunk, max_length)["word_ids"].max(dim=1).values + 1
            for row in range(len(chunk)):
                wid = enc["word_ids"][row]
                out.append(emb[row][(wid >= skip) & (wid < skip + counts[row])])
        return out

    return encode


def zero_shot_logit_scale(model: nn.Module) -> float:
    """exp(model.logit_scale) clamped to 100; 100 when the model has no logit scale."""
    param = getattr(model, "logit_scale", None)
    if param is None:
        return DEFAULT_LOGIT_SCALE
    return float(torch.as_tensor(param).detach().float().exp().clamp(max=MAX_ZERO_SHOT_SCALE))


def check_image_overlap(test: Sequence[Sample], seen: Optional[set[str]], *, test_split: str, limit: int = 5) -> None:
    """Raise :class:`EvaluationError` when a test image (by the pixel hash its manifest row
    holds in ``meta["image_sha256"]``) was a pre-training image, whatever its subject id."""
    if not seen:
        return
    dup = [s.id for s in test if s.meta.get("image_sha256") in seen]
    if dup:
        raise EvaluationError(
            f"{len(dup)} images of the test split {test_split!r} are pixel-identical to pre-training images "
            f"(same image_sha256), e.g. {', '.join(dup[:limit])}. Fix: remove the duplicates from one side "
            "(deduplicate the dataset by image hash) before evaluating."
        )


def _read_splits(cfg, dataset: str | Path, tasks: Sequence[str], pretrain_subjects: Optional[set[str]],
                 pretrain_images: Optional[set[str]] = None) -> tuple[list[Sample], list[Sample] | None]:
    test = read_manifest(dataset, [cfg.eval.split])
    if pretrain_subjects is None:
        log.warning("pretrain_subjects not given: cannot check that test subjects were unseen in pre-training")
    check_subject_overlap(
        test, pretrain_subjects, test_split=cfg.eval.split, seen_what="the pre-training data", hashed=True,
        fix="evaluate on a split whose subjects were held out of pre-training (eval.split), "
        "or pre-train without them (data.train_split).",
    )
    check_image_overlap(test, pretrain_images, test_split=cfg.eval.split)  # duplicates under other ids
    if not any(t in POOL_TASKS for t in tasks):
        return test, None
    if cfg.eval.probe_train_split == cfg.eval.split:
        raise EvaluationError(
            f"eval.probe_train_split and eval.split are both {cfg.eval.split!r}: the linear probe would be "
            "trained on its test set. Fix: set eval.probe_train_split to a training split (e.g. 'train')."
        )
    pool = read_manifest(dataset, [cfg.eval.probe_train_split])
    check_subject_overlap(
        test, {s.subject_id for s in pool}, test_split=cfg.eval.split,
        seen_what=f"the linear probe's training split {cfg.eval.probe_train_split!r}",
        fix="re-split the dataset by subject so the probe's training split and the test split are disjoint.",
    )
    return test, pool


def evaluate_models(
    models: Mapping[str, tuple[nn.Module, object]],
    cfg,
    dataset: str | Path,
    out_dir: str | Path,
    *,
    pretrain_subjects: Optional[set[str]],
    pretrain_images: Optional[set[str]] = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    prompts: str | Path | None = None,
) -> dict:
    """Evaluate each ``name -> (model, tokenizer)`` on ``dataset``; write the report into ``out_dir``.

    Args:
        models: model name -> (Method, its tokenizer).
        cfg: the :class:`~medvlp.config.ExperimentConfig` (``eval`` section, preprocessing, max length).
        dataset: a dataset folder (or its manifest.jsonl).
        out_dir: where metrics.json, report.md, roc.png and splits/ are written.
        pretrain_subjects: SHA-256 hashes of the subject ids seen in pre-training (as a
            checkpoint's pretrain_subjects.json holds them); evaluation refuses to run
            when a test subject is among them (None: not checked, a warning is logged).
        pretrain_images: pixel hashes of the pre-training images (``image_sha256`` in
            pretrain_subjects.json); a test image among them is refused too.
        prompts: an optional zero-shot prompt file (see :mod:`medvlp.eval.prompts`).
    Returns ``{model name: {"zeroshot": ..., "retrieval": ..., "linear_probe": ..., "meta": ...}}``.
    """
    tasks = list(dict.fromkeys(cfg.eval.tasks))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise EvaluationError(f"eval.tasks: got {tasks}; choose one or more of {', '.join(TASKS)}")
    if not models:
        raise EvaluationError("no model to evaluate")
    info = read_info(dataset)
    classes = info.get("classes")
    if not classes:
        raise DataError(f"{dataset}: dataset.json lists no 'classes'; regenerate or re-prepare the dataset")
    test, pool = _read_splits(cfg, dataset, tasks, pretrain_subjects, pretrain_images)
    needs_prompts = "zeroshot" in tasks or "localization" in tasks
    prompt_table = load_prompts(prompts or cfg.eval.prompts, classes) if needs_prompts else None
    out_dir = Path(out_dir)

    results: dict[str, dict] = {}
    for name, (model, tokenizer) in models.items():
        was_training = model.training
        model.eval().to(device)
        try:
            results[name] = _evaluate_one(name, model, tokenizer, cfg, classes, tasks, test, pool, prompt_table,
                                          out_dir, device=device, progress=progress,
                                          overlap_checked=pretrain_subjects is not None, dataset=dataset)
        finally:
            model.train(was_training)
    write_report(results, out_dir)
    return results


@torch.no_grad()
def evaluate_head(model: nn.Module, features: torch.Tensor, labels: torch.Tensor, classes: Sequence[str],
                  device: torch.device | str = "cpu") -> dict:
    """AUROC of a model's own classification head on (N, D) features, matched to the
    dataset's ``classes`` by name (classes only one side has are listed, not scored)."""
    head_classes = list(model.head_classes)
    common = [c for c in head_classes if c in classes]
    if not common:
        raise EvaluationError(f"the model's head predicts {head_classes}, none of the dataset's classes {list(classes)}")
    logits = model.classify_features(features.to(device)).float().cpu()
    scores = logits[:, [head_classes.index(c) for c in common]]
    out = auroc_per_class(scores, labels[:, [list(classes).index(c) for c in common]], common)
    out["not_scored"] = {"head_only": [c for c in head_classes if c not in classes],
                         "dataset_only": [c for c in classes if c not in head_classes]}
    return out


def _evaluate_one(name: str, model: nn.Module, tokenizer, cfg, classes: list[str], tasks: list[str],
                  test: list[Sample], pool: list[Sample] | None, prompt_table, out_dir: Path, *,
                  device, progress: bool, overlap_checked: bool, dataset: str | Path | None = None) -> dict:
    skipped = {}
    if not getattr(model, "supports_text", True):
        skipped = {t: "image-only model (no text encoder)" for t in tasks if t in ("zeroshot", "retrieval", "localization")}
        tasks = [t for t in tasks if t not in skipped]
        if skipped:
            log.warning("%s: %s skipped: an image-only model has no text encoder", name, ", ".join(skipped))
    probe = "linear_probe" in tasks
    has_head = hasattr(model, "classify_features") and hasattr(model, "head_classes")
    itc_texts = "retrieval" in tasks or ("retrieval_itm" in tasks and has_shared_space(model))
    emb = embed_split(model, tokenizer, test, cfg, classes, device=device, images=True,
                      texts=itc_texts, features=probe or has_head, progress=progress,
                      desc=f"{name}: {cfg.eval.split}")
    scale = zero_shot_logit_scale(model)
    out: dict = {"meta": {"split": cfg.eval.split, "n_test": len(emb.ids), "classes": list(classes),
                          "pretrain_overlap_checked": overlap_checked}}
    if skipped:
        out["meta"]["skipped_tasks"] = skipped
    if has_head:
        out["supervised_head"] = evaluate_head(model, emb.features, emb.labels, classes, device)
    if "zeroshot" in tasks:
        encode = make_text_encoder(model, tokenizer, cfg, device)
        out["zeroshot"] = evaluate_zero_shot(emb.image_emb, encode, emb.labels, classes, prompt_table, scale)
        if hasattr(model, "class_text_embeddings"):  # a method with learned prompts (UMCL): both are reported
            out["zeroshot_learned"] = _zero_shot_learned(model, emb, classes, scale)
    if "retrieval" in tasks:
        keep = torch.as_tensor(np.flatnonzero([bool(t.strip()) for t in emb.texts]), dtype=torch.long)  # images without a report have no pair
        out["retrieval"] = evaluate_retrieval(emb.image_emb[keep], emb.text_emb[keep],
                                              [emb.texts[i] for i in keep.tolist()], emb.labels[keep])
    if "retrieval_itm" in tasks:
        t0 = time.perf_counter()
        try:
            out["retrieval_itm"] = evaluate_retrieval_itm(
                model, _make_loader(test, cfg, tokenizer, classes, cfg.eval.batch_size), rerank_k=cfg.eval.itm_rerank_k,
                pool_size=cfg.eval.itm_pool_size, embeddings=emb if emb.text_emb is not None else None,
                batch_size=4 * cfg.eval.batch_size, device=device)
        except RetrievalItmSkipped as exc:
            log.warning("%s: retrieval_itm skipped: %s", name, exc)
            out["meta"].setdefault("skipped_tasks", {})["retrieval_itm"] = str(exc)
        out["meta"].setdefault("seconds", {})["retrieval_itm"] = round(time.perf_counter() - t0, 2)
    if "localization" in tasks:
        t0 = time.perf_counter()
        try:
            words = callable(getattr(model, "word_embeddings", None))
            out["localization"] = evaluate_localization(
                model, tokenizer, test, cfg, classes, make_text_encoder(model, tokenizer, cfg, device), prompt_table,
                dataset, device=device, encode_words=make_word_encoder(model, tokenizer, cfg, device) if words else None)
        except LocalizationSkipped as exc:
            log.warning("%s: localization skipped: %s", name, exc)
            out["meta"].setdefault("skipped_tasks", {})["localization"] = str(exc)
        out["meta"].setdefault("seconds", {})["localization"] = round(time.perf_counter() - t0, 2)
    tuning = "prompt_tuning" in tasks and supports_prompt_tuning(model)
    if "prompt_tuning" in tasks and not tuning:
        out["meta"].setdefault("skipped_tasks", {})["prompt_tuning"] = "the model has no learned prompts"
    train, t0 = None, time.perf_counter()
    if probe or tuning:
        train = embed_split(model, tokenizer, pool, cfg, classes, device=device, images=tuning, features=probe,
                            progress=progress, desc=f"{name}: {cfg.eval.probe_train_split}")
    if probe:
        out["linear_probe"] = evaluate_linear_probe(
            train.features, train.labels, train.ids, emb.features, emb.labels, classes,
            cfg.eval.fractions, cfg.eval.min_positives, cfg.eval.probe_seeds, out_dir,
        )
        out["linear_probe"]["features"] = "image_features" if hasattr(model, "image_features") else "encode_image"
        out["linear_probe"]["train_split"] = cfg.eval.probe_train_split
        out["meta"].setdefault("seconds", {})["linear_probe"] = round(time.perf_counter() - t0, 2)  # with the train pass
    if tuning:
        t0 = time.perf_counter()
        out["prompt_tuning"] = evaluate_prompt_tuning(
            model, train.image_emb, train.labels, train.ids, emb.image_emb, emb.labels, classes, cfg.eval.fractions,
            cfg.eval.min_positives, cfg.eval.probe_seeds, out_dir, steps=cfg.eval.prompt_tuning_steps,
            lr=cfg.eval.prompt_tuning_lr, logit_scale=scale,
        )
        out["prompt_tuning"]["train_split"] = cfg.eval.probe_train_split
        out["meta"].setdefault("seconds", {})["prompt_tuning"] = round(time.perf_counter() - t0, 2)
    _downstream(name, model, tokenizer, cfg, classes, tasks, test, pool, out, device=device, dataset=dataset,
                out_dir=out_dir)
    return out


def _downstream(name: str, model: nn.Module, tokenizer, cfg, classes: list[str], tasks: list[str],
                test: list[Sample], pool: list[Sample] | None, out: dict, *, device, dataset, out_dir: Path) -> None:
    """VQA, full fine-tuning, segmentation and detection (each trains a head on the probe's training split);
    a task that does not apply is listed under ``meta.skipped_tasks`` with the reason."""
    from medvlp.data.manifest import resolve_manifest
    from medvlp.eval.detection import evaluate_detection
    from medvlp.eval.finetune import evaluate_finetune
    from medvlp.eval.segmentation import DenseTaskSkipped, evaluate_segmentation
    from medvlp.eval.vqa import evaluate_vqa

    seeds = tuple(range(cfg.eval.probe_seeds))
    fractions = tuple(cfg.eval.fractions)
    runs = {
        "vqa": lambda: evaluate_vqa(model, tokenizer, pool, test, cfg, seeds=seeds, device=device),
        "finetune": lambda: evaluate_finetune(model, pool, test, cfg, classes, fractions=fractions, seeds=seeds,
                                              device=device, tokenizer=tokenizer, out_dir=out_dir),
        "segmentation": lambda: evaluate_segmentation(model, tokenizer, pool, test, cfg, classes,
                                                      resolve_manifest(dataset).parent, fractions=fractions,
                                                      seeds=seeds, min_positives=cfg.eval.min_positives,
                                                      device=device, encoder=cfg.eval.segmentation_encoder),
        "detection": lambda: evaluate_detection(model, tokenizer, pool, test, cfg, classes, fractions=fractions,
                                                seeds=seeds, min_positives=cfg.eval.min_positives, device=device),
    }
    for task, run in runs.items():
        if task not in tasks:
            continue
        t0 = time.perf_counter()
        try:
            out[task] = run()
        except (DenseTaskSkipped, EvaluationError) as exc:
            if isinstance(exc, SplitFileError):  # another run's subsets: stop, as prompt tuning does
                raise
            log.warning("%s: %s skipped: %s", name, task, exc)
            out["meta"].setdefault("skipped_tasks", {})[task] = str(exc)
        out["meta"].setdefault("seconds", {})[task] = round(time.perf_counter() - t0, 2)


@torch.no_grad()
def _zero_shot_learned(model: nn.Module, emb: SplitEmbeddings, classes: list[str], scale: float) -> dict:
    """Zero-shot AUROC with the model's learned prompts, on the classes it has prompts for."""
    known = set(getattr(model, "learned_prompt_classes", classes))
    common = [c for c in classes if c in known]
    if not common:
        raise EvaluationError(f"the model's learned prompts cover none of the dataset's classes {classes}")
    pos, neg = model.class_text_embeddings(common)
    result = evaluate_zero_shot_embeddings(emb.image_emb, pos, neg, emb.labels[:, [classes.index(c) for c in common]],
                                           common, scale)
    result["prompts"] = "learned"
    result["not_scored"] = [c for c in classes if c not in known]
    return result
