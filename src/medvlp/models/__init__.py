"""Encoders: ViT, BERT-style text encoders; they register in medvlp.registry.ENCODERS.

Registered names: ``vit`` (the :class:`VisionTransformer` class, built from a
``VisionConfig``), ``bert`` and ``hf`` (both :func:`build_text_encoder`, called with a
``TextConfig`` and a tokenizer).
"""
from medvlp.config import TextConfig, VisionConfig
from medvlp.models.output import EncoderOutput
from medvlp.models.text import TextEncoder, build_text_encoder
from medvlp.models.vit import VisionTransformer
from medvlp.registry import ENCODERS

ENCODERS.register("vit", VisionConfig, "Vision Transformer (pre-norm, [CLS], sin-cos positions, MAE masking)")(
    VisionTransformer
)
ENCODERS.register("bert", TextConfig, "BERT text encoder trained from scratch with a WordPiece tokenizer")(
    build_text_encoder
)
ENCODERS.register("hf", TextConfig, "local Hugging Face text model (e.g. MiniLM) loaded offline")(build_text_encoder)

__all__ = ["EncoderOutput", "TextEncoder", "VisionTransformer", "build_text_encoder"]
