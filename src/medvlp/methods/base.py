"""The contract every pre-training method follows.

A method is an ``nn.Module`` that owns its encoders and heads and turns a
:class:`~medvlp.data.sample.Batch` into named losses:

``forward(batch) -> dict[str, Tensor]``: the entry ``"loss"`` is the objective the
training loop back-propagates; every other entry is a detached scalar for logging
(its weighted loss terms and metrics such as the logit scale).

``after_optimizer_step(step)`` runs once per optimizer step (not per micro-batch), for
EMA teachers and momentum updates. A method never reaches into the training loop.

For evaluation every method exposes ``encode_image`` / ``encode_text`` returning
L2-normalised embeddings in the shared space.
"""
from __future__ import annotations

import torch
from torch import nn


class Method(nn.Module):
    #: parameter-name substrings that get no weight decay (besides biases and norms)
    no_weight_decay: tuple[str, ...] = ("logit_scale", "cls_token", "pos_embed")
    #: whether ``forward`` accepts rows without an image (``Batch.has_image`` False: a
    #: ``report`` source); the training loop refuses such a source for every other method
    takes_report_only_rows: bool = False

    def forward(self, batch) -> dict[str, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def after_optimizer_step(self, step: int) -> None:
        """Hook for EMA / momentum updates; called once per optimizer step."""

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Un-normalised pooled image-encoder features (what the linear probe sees)."""
        return self.vision(images).pooled

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def patch_embeddings(self, images: torch.Tensor) -> torch.Tensor | None:
        """(B, N, D) L2-normalised patch embeddings in the shared space (row-major patch grid),
        for localisation maps; None when the method has none (the localisation task skips it)."""
        return None

    def word_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """(B, L, D) L2-normalised token embeddings in the shared space (every position, special
        tokens and padding included; the caller picks the words), for the word-level localisation
        maps; None when the method has none."""
        return None



class ImageOnlyMethod(Method):
    """A method without a text encoder (MAE, the supervised ceiling): evaluation runs only
    the image tasks (linear probe) and skips zero-shot and retrieval."""

    supports_text = False

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        # only so generic image-embedding code runs; there is no shared text space
        return torch.nn.functional.normalize(self.image_features(images), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no text encoder (zero-shot and retrieval do not apply)")

def dataset_classes(cfg, what: str) -> list[str]:
    """``method.classes``, or else the training dataset's classes (dataset.json); ``what`` names
    the part that needs them in the error (e.g. "the supervised head")."""
    from medvlp.errors import ConfigError, DataError

    if cfg.method.classes:
        return list(cfg.method.classes)
    if not cfg.data.manifest:
        raise ConfigError(f"method.classes: empty and data.manifest is unset, so {what} has no classes; "
                          "point data.manifest at the dataset (or list the classes in method.classes)")
    from medvlp.data.manifest import read_info

    classes = read_info(cfg.data.manifest).get("classes") or []
    if not classes:
        raise DataError(f"{cfg.data.manifest}: dataset.json lists no 'classes' for {what}")
    return list(classes)


def build_towers(cfg, tokenizer, *, load_text_weights: bool = True) -> tuple[nn.Module, nn.Module]:
    """The image and text encoders named by ``cfg.model`` (shared by every method).
    ``load_text_weights=False`` builds a Hugging Face text model from its config only
    (its weights then come from a medvlp checkpoint)."""
    from medvlp.models.text import build_text_encoder
    from medvlp.models.vit import VisionTransformer

    return VisionTransformer(cfg.model.vision), build_text_encoder(cfg.model.text, tokenizer, load_weights=load_text_weights)


def projection(in_dim: int, out_dim: int, kind: str = "linear") -> nn.Module:
    """Projection into the shared embedding space: bias-free linear, or a 2-layer MLP."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim, bias=False))
    raise ValueError(f"unknown projection {kind!r}")
