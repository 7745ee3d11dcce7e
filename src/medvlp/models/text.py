"""Text encoders: a small BERT trained from scratch, or a local Hugging Face model.

Both are wrapped by :class:`TextEncoder`, which pools the last hidden states (``cls``:
the first token; ``mean``: the mean over valid tokens, the sentence-transformers
convention of MiniLM) and returns an :class:`~medvlp.models.output.EncoderOutput`.

The Hugging Face model runs with SDPA attention. When the last layer's [CLS] attention
is requested, that one call switches the model to eager attention (SDPA cannot return
attention probabilities) and switches back afterwards. Pooler layers are removed: they
are never used, and unused parameters would break DDP and the every-parameter-gets-a-
gradient checks. ``transformers`` is imported lazily because its model classes are slow
to import and the ViT alone does not need them.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from medvlp.config import TextConfig
from medvlp.errors import CheckpointError, ConfigError
from medvlp.models.output import EncoderOutput

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, N, D) over positions where ``attention_mask`` (B, N) is 1."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


@contextlib.contextmanager
def _eager_attention(model: "PreTrainedModel") -> Iterator[None]:
    """Temporarily run ``model`` with eager attention so it can return attention maps."""
    current = model.config._attn_implementation
    if current == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(current)


class TextEncoder(nn.Module):
    """A Hugging Face encoder-only model plus pooling, returning :class:`EncoderOutput`."""

    def __init__(self, model: "PreTrainedModel", pooling: str = "cls"):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ConfigError(f"model.text.pooling: invalid value {pooling!r}; allowed values: 'cls', 'mean'")
        if getattr(model, "pooler", None) is not None:
            model.pooler = None  # unused; see the module docstring
        self.model = model
        self.pooling = pooling
        self.width: int = model.config.hidden_size

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # transformers 5 renamed gradient_* to activation_checkpointing_*; support both
        model = self.model
        if enable and getattr(model.config, "use_cache", False):
            model.config.use_cache = False  # an encoder has no cache; avoids a warning per call
        if hasattr(model, "activation_checkpointing_enable"):
            if enable:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.activation_checkpointing_disable()
        elif enable:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()

    def save_config(self, directory: str | Path) -> None:
        """Write the Hugging Face ``config.json`` that rebuilds this architecture."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.model.config.save_pretrained(str(directory))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_attention: bool = False,
    ) -> EncoderOutput:
        """Encode token ids (B, N) or input embeddings (B, N, D).

        ``return_attention`` adds ``cls_attention`` (B, heads, N): the last layer's
        attention probabilities from [CLS] (position 0) to every token, [CLS] included;
        padding columns are 0 and rows sum to 1 (in training mode the model's attention
        dropout has been applied to them, as Hugging Face returns them).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        reference = input_ids if input_ids is not None else inputs_embeds
        padding_mask = None if attention_mask is None else attention_mask == 0
        if attention_mask is None:
            attention_mask = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)

        context = _eager_attention(self.model) if return_attention else contextlib.nullcontext()
        with context:
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                output_attentions=return_attention,
                return_dict=True,
            )
        hidden = out.last_hidden_state
        pooled = hidden[:, 0] if self.pooling == "cls" else mean_pool(hidden, attention_mask)
        cls_attention = out.attentions[-1][:, :, 0, :] if return_attention else None
        return EncoderOutput(pooled=pooled, tokens=hidden, padding_mask=padding_mask, cls_attention=cls_attention)


# --------------------------------------------------------------------------- factory


def _read_hf_config(directory: str | Path | None, what: str, error: type[Exception]) -> "PretrainedConfig":
    from transformers import AutoConfig

    path = Path(directory) if directory else None
    if path is None or not (path / "config.json").is_file():
        raise error(
            f"{what}: {str(directory)!r} is not a Hugging Face model directory (no config.json there); "
            "point it to a local folder holding config.json and the model weights"
        )
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise error(f"{what}: cannot read {path / 'config.json'} ({exc})") from None


def _bert_config(cfg: TextConfig, tokenizer: "PreTrainedTokenizerBase") -> "PretrainedConfig":
    from transformers import BertConfig

    if tokenizer.pad_token_id is None:
        raise ConfigError(
            "model.text: the tokenizer has no [PAD] token; train one with medvlp.data.tokenize.train_wordpiece"
        )
    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.width,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads,
        intermediate_size=int(cfg.width * cfg.mlp_ratio),
        max_position_embeddings=cfg.max_length,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_text_encoder(
    cfg: TextConfig,
    tokenizer: "PreTrainedTokenizerBase",
    *,
    config_dir: str | Path | None = None,
    load_weights: bool = True,
) -> TextEncoder:
    """Build the text encoder described by ``cfg``.

    ``bert``: a BERT initialised from scratch, sized by ``cfg`` with the tokenizer's
    vocabulary (or rebuilt from the ``config.json`` in ``config_dir`` when given, i.e.
    when the weights come from a medvlp checkpoint).
    ``hf``: the local model at ``cfg.path`` with its pretrained weights, or, with
    ``load_weights=False``, only its architecture (from ``config_dir`` or ``cfg.path``),
    to be filled from a checkpoint. Nothing is ever downloaded.
    """
    from transformers import AutoModel, BertModel

    if cfg.name == "bert":
        if config_dir is not None:
            hf_config = _read_hf_config(config_dir, "text encoder config directory", CheckpointError)
        else:
            hf_config = _bert_config(cfg, tokenizer)
        hf_config._attn_implementation = "sdpa"
        model = BertModel(hf_config, add_pooling_layer=False)
    elif cfg.name == "hf":
        if load_weights:
            _read_hf_config(cfg.path, "model.text.path", ConfigError)
            try:
                model = AutoModel.from_pretrained(cfg.path, local_files_only=True)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"model.text.path: cannot load the model in {cfg.path!r} ({exc})") from None
        else:
            if config_dir is not None:
                hf_config = _read_hf_config(config_dir, "text encoder config directory", CheckpointError)
            else:
                hf_config = _read_hf_config(cfg.path, "model.text.path", ConfigError)
            model = AutoModel.from_config(hf_config)
    else:
        raise ConfigError(f"model.text.name: invalid value {cfg.name!r}; allowed values: 'bert', 'hf'")

    encoder = TextEncoder(model, pooling=cfg.pooling)
    if cfg.grad_checkpointing:
        encoder.set_grad_checkpointing(True)
    return encoder
