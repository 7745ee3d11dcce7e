"""Visual question answering as answer classification, always beside two language-prior baselines.

SynthCXR manifest rows carry ``meta["vqa"]``: a list of ``{question, answer, type: closed|open,
kind, finding}`` generated from the drawn findings (:mod:`medvlp.data.synth.vqa`). The protocol:

- **Answer vocabulary**: every answer seen in the *training* pairs. A test answer outside it can
  never be predicted and counts as wrong; how many there are is reported (``n_test_unseen_answers``).
- **Features** (the encoders stay frozen; image features are computed once per split):

  * *dual* (default): image = ``model.image_features(images)`` (``encode_image`` when absent),
    concatenated with the mean of the ViT's patch tokens when the model has a ``vision`` tower;
    question = the text tower's pooled output (``model.text(ids, mask).pooled``, before any
    projection, like ``image_features``), else ``model.encode_text`` for models with
    ``supports_text``, else - for image-only models - a bag of words over the training
    questions' words, embedded by a linear layer learned with the head. Both parts are
    standardised with training statistics and concatenated.
  * *fused*: a model with a hook ``vqa_features(images, input_ids, attention_mask) -> (B, D)``
    (a fusion encoder, e.g. M3AE / MPMA) is scored on those per-pair features instead.

- **Head** (:class:`VqaHead`): image part and question part each projected to ``HIDDEN``;
  ``[v, q, v * q] -> GELU -> Linear(3 HIDDEN, HIDDEN) -> GELU -> Linear(HIDDEN, n_answers)``;
  cross-entropy, AdamW (``LR``, ``WEIGHT_DECAY``), ``EPOCHS`` epochs of shuffled mini-batches of
  ``BATCH_SIZE`` pairs (more epochs when that is under ``MIN_STEPS`` updates, for small training
  splits); the seed drives the head's initialisation, the batch order and the image shuffle.
- **Baselines**, run by the same call with the same head and schedule:

  * ``question_only``: the head trained and tested without image features (question part only):
    what language priors alone reach;
  * ``image_shuffled``: the model's head tested with the test images permuted among the test
    questions (for fused models the fused features are recomputed on the permuted images).

  An image-grounded model must beat both; closed (yes/no) questions are balanced by the
  generator, so ``question_only`` sits near 50 % on them.

Metrics: accuracy on closed, open and all test pairs (and per question ``kind``), mean ± sd
(ddof=1) over seeds.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medvlp.data.sample import Sample
from medvlp.errors import DataError, EvaluationError
from medvlp.eval.segmentation import standardise

HIDDEN = 256
EPOCHS = 40
LR = 1e-3
WEIGHT_DECAY = 1e-4
BATCH_SIZE = 256
MIN_STEPS = 500  # small training splits still get enough updates to learn question x image interactions
BOW_DIM = 64
PATCH_MEAN = True
_WORD = re.compile(r"[a-z0-9]+")


PAIR_KEYS = ("question", "answer", "type")  # ``kind`` (the per-kind breakdown) may be empty or absent
PAIR_TYPES = ("closed", "open")


def vqa_pairs_of(samples: Sequence[Sample]) -> list[tuple[int, dict]]:
    """(sample index, pair) for every VQA pair of ``samples`` (``meta["vqa"]``); a malformed pair
    raises :class:`DataError` naming the sample and the field."""
    pairs = []
    for i, s in enumerate(samples):
        for q in s.meta.get("vqa", []) or []:
            missing = [k for k in PAIR_KEYS if not isinstance(q, dict) or not isinstance(q.get(k), str) or not q[k]]
            if missing:
                raise DataError(f"sample {s.id}: meta.vqa pair {q!r} lacks a non-empty string {', '.join(missing)}; "
                                f"each pair needs {', '.join(PAIR_KEYS)} (type closed or open) and may name a kind")
            if q["type"] not in PAIR_TYPES:
                raise DataError(f"sample {s.id}: meta.vqa pair type {q['type']!r} is not closed or open")
            pairs.append((i, q))
    return pairs


def _load_images(samples: Sequence[Sample], cfg, tokenizer) -> tuple[list[str], torch.Tensor]:
    """All images of ``samples`` preprocessed for evaluation, in order: (ids, (N, C, H, W))."""
    from medvlp.data.loader import make_loader

    ids, images = [], []
    for batch in make_loader(samples, cfg, tokenizer, [], batch_size=cfg.eval.batch_size):
        ids += list(batch.ids)
        images.append(batch.images)
    if not ids:
        raise DataError("vqa: the loader produced no images (is the split empty?)")
    return ids, torch.cat(images)


@torch.no_grad()
def image_feature_table(model, images: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """(N, D) frozen image features: ``image_features`` (or ``encode_image``) + patch-token mean."""
    feature_fn = getattr(model, "image_features", None) or model.encode_image
    vision = getattr(model, "vision", None) if PATCH_MEAN else None
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        parts = [feature_fn(x).float()]
        if vision is not None:
            parts.append(vision(x).tokens.float().mean(1))
        out.append(torch.cat(parts, 1).cpu())
    return torch.cat(out)


def question_source(model, tokenizer) -> str:
    """Which question features the dual head gets: ``text_tower`` | ``encode_text`` | ``bag_of_words``."""
    if tokenizer is not None and isinstance(getattr(model, "text", None), nn.Module):
        return "text_tower"
    if tokenizer is not None and getattr(model, "supports_text", True) and callable(getattr(model, "encode_text", None)):
        return "encode_text"
    return "bag_of_words"


@torch.no_grad()
def question_feature_table(model, tokenizer, questions: list[str], cfg, source: str, train_questions: list[str],
                           device) -> torch.Tensor:
    """(Q, D) features of each distinct question; for ``bag_of_words`` the (Q, V) mean word
    indicators over the training questions' vocabulary (embedded by the head)."""
    if source == "bag_of_words":
        vocab = {w: k for k, w in enumerate(sorted({w for q in train_questions for w in _WORD.findall(q.lower())}))}
        table = torch.zeros(len(questions), max(1, len(vocab)))
        for row, q in enumerate(questions):  # a few dozen distinct questions: the loop is cheap
            cols = [vocab[w] for w in _WORD.findall(q.lower()) if w in vocab]
            if cols:
                table[row, cols] = 1.0 / len(cols)
        return table
    from medvlp.data.tokenize import encode_texts

    out = []
    for start in range(0, len(questions), cfg.eval.batch_size):
        enc = encode_texts(tokenizer, questions[start:start + cfg.eval.batch_size], cfg.model.text.max_length)
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        feats = model.text(ids, mask).pooled if source == "text_tower" else model.encode_text(ids, mask)
        out.append(feats.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def fused_feature_table(model, tokenizer, images: torch.Tensor, image_index: torch.Tensor, questions: list[str],
                        question_index: torch.Tensor, cfg, device) -> torch.Tensor:
    """(P, D) ``model.vqa_features`` of each (image, question) pair."""
    from medvlp.data.tokenize import encode_texts

    enc = encode_texts(tokenizer, questions, cfg.model.text.max_length)
    out = []
    for start in range(0, len(image_index), cfg.eval.batch_size):
        sl = slice(start, start + cfg.eval.batch_size)
        q = question_index[sl]
        out.append(model.vqa_features(images[image_index[sl]].to(device), enc["input_ids"][q].to(device),
                                      enc["attention_mask"][q].to(device)).float().cpu())
    return torch.cat(out)


class VqaHead(nn.Module):
    """Answer classifier over [pair features, question features] (``pair_dim`` 0 = question only).

    Both parts are projected to ``HIDDEN``; the MLP sees the concatenation of the two
    projections and their element-wise product. The product lets a small head learn
    question-conditioned reads of the image ("is *this* finding present") from few pairs,
    which plain concatenation learns far more slowly. A bag-of-words question table is embedded
    by a learned linear layer first.
    """

    def __init__(self, pair_dim: int, question_table: torch.Tensor, n_answers: int, learn_question_embedding: bool):
        super().__init__()
        self.register_buffer("question_table", question_table.float(), persistent=False)
        q_in = question_table.shape[1]
        self.question_proj = nn.Sequential(nn.Linear(q_in, BOW_DIM), nn.Linear(BOW_DIM, HIDDEN)) \
            if learn_question_embedding else nn.Linear(q_in, HIDDEN)
        self.pair_proj = nn.Linear(pair_dim, HIDDEN) if pair_dim else None
        parts = 3 if pair_dim else 1
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(parts * HIDDEN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, n_answers))

    def forward(self, pair_feats: torch.Tensor | None, question_index: torch.Tensor) -> torch.Tensor:
        q = self.question_proj(self.question_table[question_index])
        if self.pair_proj is None or pair_feats is None:
            return self.mlp(q)
        v = self.pair_proj(pair_feats)
        return self.mlp(torch.cat([v, q, v * q], 1))


def train_head(head: VqaHead, pair_feats: torch.Tensor | None, question_index: torch.Tensor, targets: torch.Tensor,
               seed: int) -> VqaHead:
    """Cross-entropy training with the fixed schedule (module docstring); returns ``head`` in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    head.train()
    n = len(targets)
    steps_per_epoch = -(-n // BATCH_SIZE)
    epochs = max(EPOCHS, -(-MIN_STEPS // steps_per_epoch))
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=gen).split(BATCH_SIZE):
            logits = head(None if pair_feats is None else pair_feats[idx], question_index[idx])
            loss = F.cross_entropy(logits, targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head.eval()


def accuracies(correct: np.ndarray, types: np.ndarray, kinds: np.ndarray) -> dict:
    """Accuracy over closed, open and all pairs, and per question kind (None where no pair)."""
    correct = np.asarray(correct, dtype=np.float64)

    def acc(sel):
        return float(correct[sel].mean()) if sel.any() else None

    return {"closed": acc(types == "closed"), "open": acc(types == "open"), "overall": acc(np.ones(len(correct), dtype=bool)),
            "per_kind": {k: acc(kinds == k) for k in sorted(set(kinds.tolist()))}}


def _aggregate(per_seed: list[dict]) -> dict:
    out = {}
    for key in ("closed", "open", "overall"):
        vals = np.array([r[key] for r in per_seed if r[key] is not None], dtype=np.float64)
        out[key] = {"mean": float(vals.mean()) if len(vals) else None,
                    "sd": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0, "per_seed": vals.tolist()}
    out["per_kind"] = {k: float(np.mean([r["per_kind"][k] for r in per_seed])) for k in per_seed[0]["per_kind"]}
    return out


def evaluate_vqa(model, tokenizer, train_samples: Sequence[Sample], test_samples: Sequence[Sample], cfg, *,
                 seeds: Sequence[int] = (0,), device: torch.device | str = "cpu") -> dict:
    """VQA accuracy of ``model`` with its question-only and image-shuffled baselines (module docstring).

    Args:
        model: a method (``image_features`` or ``encode_image``; optional ``vision``, ``text``,
            ``encode_text``, ``vqa_features``), used frozen in eval mode.
        tokenizer: the model's tokenizer (the loader and the question encoder use it).
        train_samples / test_samples: samples whose ``meta["vqa"]`` hold the pairs (subject-disjoint).
        cfg: the experiment config (preprocessing, ``model.text.max_length``, ``eval.batch_size``).
        seeds: one head (and one image shuffle) per seed.
    Returns ``{"features", "question_features", "n_answers", "answers", "n_train_pairs",
    "n_test_pairs", "n_test_unseen_answers", "seeds", "model", "question_only", "image_shuffled"}``;
    the last three hold ``{closed|open|overall: {mean, sd, per_seed}, per_kind: {kind: mean}}``.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise EvaluationError("vqa: at least one seed is needed")
    train_pairs, test_pairs = vqa_pairs_of(train_samples), vqa_pairs_of(test_samples)
    if not train_pairs or not test_pairs:
        raise EvaluationError(f"vqa: {len(train_pairs)} training and {len(test_pairs)} test question-answer pairs; "
                              "both splits need samples with meta['vqa'] (SynthCXR writes them)")
    was_training = model.training
    model.eval()
    try:
        train_ids, train_images = _load_images(train_samples, cfg, tokenizer)
        test_ids, test_images = _load_images(test_samples, cfg, tokenizer)
        train_row = {sid: r for r, sid in enumerate(train_ids)}
        test_row = {sid: r for r, sid in enumerate(test_ids)}
        # pairs of images the loader could not read are dropped (the loader reports them)
        train_pairs = [(train_row[train_samples[i].id], q) for i, q in train_pairs if train_samples[i].id in train_row]
        test_pairs = [(test_row[test_samples[i].id], q) for i, q in test_pairs if test_samples[i].id in test_row]

        answers = sorted({q["answer"] for _, q in train_pairs})
        answer_id = {a: k for k, a in enumerate(answers)}
        questions = sorted({q["question"] for _, q in train_pairs + test_pairs})
        question_id = {t: k for k, t in enumerate(questions)}

        def index(pairs):
            img = torch.tensor([r for r, _ in pairs], dtype=torch.long)
            qid = torch.tensor([question_id[q["question"]] for _, q in pairs], dtype=torch.long)
            target = torch.tensor([answer_id.get(q["answer"], -1) for _, q in pairs], dtype=torch.long)
            return img, qid, target, np.array([q["type"] for _, q in pairs]), np.array([q.get("kind") or "" for _, q in pairs])

        tr_img, tr_q, tr_y, _, _ = index(train_pairs)
        te_img, te_q, te_y, te_types, te_kinds = index(test_pairs)

        source = question_source(model, tokenizer)
        train_questions = sorted({q["question"] for _, q in train_pairs})
        q_table = question_feature_table(model, tokenizer, questions, cfg, source, train_questions, device)
        learn_q = source == "bag_of_words"
        if not learn_q:
            q_table = standardise(q_table[torch.unique(tr_q)], q_table)[1]
        fused = callable(getattr(model, "vqa_features", None)) and tokenizer is not None
        batch = cfg.eval.batch_size
        if fused:
            tr_x = fused_feature_table(model, tokenizer, train_images, tr_img, questions, tr_q, cfg, device)
            te_x = fused_feature_table(model, tokenizer, test_images, te_img, questions, te_q, cfg, device)
        else:
            train_feats, test_feats = standardise(image_feature_table(model, train_images, batch, device),
                                                   image_feature_table(model, test_images, batch, device))

        results: dict[str, list[dict]] = {"model": [], "question_only": [], "image_shuffled": []}
        for seed in seeds:
            torch.manual_seed(seed)
            perm = te_img[torch.randperm(len(te_img), generator=torch.Generator().manual_seed(10_000 + seed))]
            if fused:
                shuffled_x = fused_feature_table(model, tokenizer, test_images, perm, questions, te_q, cfg, device)
                tr_x_s, te_x_s, shuffled_x = standardise(tr_x, te_x, shuffled_x)
            else:
                tr_x_s, te_x_s, shuffled_x = train_feats[tr_img], test_feats[te_img], test_feats[perm]
            head = train_head(VqaHead(tr_x_s.shape[1], q_table, len(answers), learn_q), tr_x_s, tr_q, tr_y, seed)
            torch.manual_seed(seed)
            q_head = train_head(VqaHead(0, q_table, len(answers), learn_q), None, tr_q, tr_y, seed)
            with torch.no_grad():
                preds = {"model": head(te_x_s, te_q), "question_only": q_head(None, te_q),
                         "image_shuffled": head(shuffled_x, te_q)}
            for name, logits in preds.items():
                correct = (logits.argmax(1) == te_y).numpy()
                results[name].append(accuracies(correct, te_types, te_kinds))
    finally:
        model.train(was_training)

    image_desc = ("image_features" if callable(getattr(model, "image_features", None)) else "encode_image") + (
        " + patch-token mean" if PATCH_MEAN and getattr(model, "vision", None) is not None else "")
    return {
        "features": "fused: model.vqa_features(image, question)" if fused else f"dual: [{image_desc}] + question",
        "question_features": source,
        "head": f"MLP({HIDDEN}) cross-entropy, AdamW lr {LR}, {EPOCHS} epochs (>= {MIN_STEPS} steps), "
                f"batch {BATCH_SIZE}",
        "n_answers": len(answers),
        "answers": answers,
        "n_train_pairs": len(train_pairs),
        "n_test_pairs": len(test_pairs),
        "n_test_unseen_answers": int((te_y < 0).sum()),
        "seeds": seeds,
        **{name: _aggregate(rows) for name, rows in results.items()},
    }


__all__ = ["VqaHead", "accuracies", "evaluate_vqa", "question_source", "vqa_pairs_of"]
