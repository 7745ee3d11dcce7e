"""Build methods and load model bundles (checkpoint folders) for evaluation and export."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medvlp.config import build_config
from medvlp.errors import CheckpointError
from medvlp.registry import METHODS
from medvlp.train.checkpoint import latest_checkpoint, load_weights


def build_method(cfg, tokenizer, *, load_text_weights: bool = True) -> torch.nn.Module:
    """Instantiate ``cfg.method.name`` with the encoders of ``cfg.model``."""
    return METHODS.get(cfg.method.name)(cfg, tokenizer, load_text_weights=load_text_weights)


@dataclass
class Bundle:
    method: torch.nn.Module
    tokenizer: object
    cfg: object
    classes: list[str]
    preprocess: dict
    pretrain_subject_hashes: set[str]
    path: Path
    pretrain_image_hashes: set[str] = field(default_factory=set)


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder or a run folder (its latest checkpoint)."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(
            f"{path} is neither a checkpoint folder (with model.safetensors) nor a run folder with checkpoints/step_*"
        )
    return latest


def load_bundle(path: str | Path, *, device: str | torch.device = "cpu", weights: bool = True) -> Bundle:
    """Rebuild a method from its checkpoint folder. ``weights=False`` keeps the random
    initialisation (the same architecture, tokenizer and preprocessing)."""
    from medvlp.data.tokenize import load_tokenizer

    path = resolve_checkpoint(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / 'config.json'}: unreadable ({exc})") from None
    raw = copy.deepcopy(config["experiment"])
    cfg = build_config(raw)
    if hasattr(cfg.method, "classes") and not cfg.method.classes:
        # a classification head is sized by the classes it was trained on, not today's dataset.json
        cfg.method.classes = list(config["classes"])
    if cfg.model.text.name == "hf":
        cfg.model.text.path = str(path / "text_config")
    tokenizer = load_tokenizer(path / "tokenizer")
    torch.manual_seed(cfg.train.seed)  # the same initialisation as the run's step 0
    method = build_method(cfg, tokenizer, load_text_weights=False)
    if weights:
        load_weights(method, path)
    seen = json.loads((path / "pretrain_subjects.json").read_text())
    return Bundle(method.to(device).eval(), tokenizer, cfg, config["classes"], config["preprocess"], set(seen["sha256"]),
                  path, set(seen.get("image_sha256", [])))
