"""Image-text retrieval: Recall@K both ways and label precision@K.

Reports are often templated, so many test samples share the exact same text. A
retrieved text that is identical to the ground truth (after lower-casing and
collapsing whitespace) is a correct answer, and so is, for text -> image, any image
whose own report is identical to the query. Relevance is therefore a matrix built from
text-equality groups (``np.unique`` inverse indices), not the identity.

Label precision@K is the fraction of the top-K retrieved items whose set of positive
labels equals the query's; it rewards clinically right answers that are worded
differently.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from medvlp.errors import EvaluationError
from medvlp.eval.metrics import DEFAULT_KS, label_precision_at_k, recall_at_k, to_numpy


def normalise_text(text: str) -> str:
    """Lower-case and collapse runs of whitespace (the text-equality used for hits)."""
    return " ".join(text.lower().split())


def text_groups(texts: Sequence[str]) -> np.ndarray:
    """(N,) group id per text; equal ids <=> equal texts after :func:`normalise_text`."""
    _, inverse = np.unique(np.array([normalise_text(t) for t in texts], dtype=object), return_inverse=True)
    return inverse.reshape(-1)


def evaluate_retrieval(
    image_emb: Any,
    text_emb: Any,
    texts: Sequence[str],
    labels: Any,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict:
    """Retrieval metrics over N paired samples (image i is paired with text i).

    Args:
        image_emb: (N, E) L2-normalised image embeddings.
        text_emb: (N, E) L2-normalised text embeddings.
        texts: the N report texts (for the identical-text rule).
        labels: (N, K) label codes (for label precision@K).
        ks: the cut-offs.
    Returns:
        ``{"image_to_text": {"R@1": ..}, "text_to_image": {..},
        "label_precision": {"image_to_text": {"P@1": ..}, "text_to_image": {..}},
        "n": N, "n_unique_texts": int}``
    """
    img, txt = to_numpy(image_emb).astype(np.float64), to_numpy(text_emb).astype(np.float64)
    lab = to_numpy(labels)
    n = img.shape[0]
    if img.ndim != 2 or txt.shape != img.shape or len(texts) != n or lab.shape[0] != n:
        raise EvaluationError(
            f"retrieval needs N paired items: got image_emb {img.shape}, text_emb {txt.shape}, "
            f"{len(texts)} texts and labels {lab.shape}"
        )
    if n == 0:
        raise EvaluationError("retrieval: the test split has no samples with report text")
    groups = text_groups(texts)
    relevant = groups[:, None] == groups[None, :]  # symmetric: (image query i, text j) and (text i, image j)
    sim = img @ txt.T  # (images, texts)
    return {
        "image_to_text": recall_at_k(sim, relevant, ks),
        "text_to_image": recall_at_k(sim.T, relevant, ks),
        "label_precision": {
            "image_to_text": label_precision_at_k(sim, lab, lab, ks),
            "text_to_image": label_precision_at_k(sim.T, lab, lab, ks),
        },
        "n": int(n),
        "n_unique_texts": int(groups.max() + 1),
    }
