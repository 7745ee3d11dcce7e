"""Typed experiment configuration: dataclass schemas, YAML loading, dotted overrides.

A config file is YAML. It may ``include`` other YAML files (paths relative to the
including file); included files are merged first and the including file wins. Command
line overrides are ``dotted.key=value`` strings whose value is parsed as YAML.

Validation is strict: an unknown key, a wrong type or a value outside a ``Literal``
raises :class:`~medvlp.errors.ConfigError` naming the dotted key and what is allowed.
The ``method`` section is validated against the config class that the chosen method
registered (see :mod:`medvlp.registry`).
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from medvlp.errors import ConfigError

Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class VisionConfig:
    """Image encoder. ``name`` picks an entry of the encoder registry."""

    name: Literal["vit"] = "vit"
    image_size: int = 64
    patch_size: int = 8
    in_chans: int = 1
    width: int = 192
    depth: int = 6
    heads: int = 3
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    grad_checkpointing: bool = False


@dataclass
class TextConfig:
    """Text encoder: ``bert`` is a small BERT trained from scratch with a WordPiece
    tokenizer trained on the pre-training reports; ``hf`` loads a Hugging Face model
    directory (``path``) with its own tokenizer."""

    name: Literal["bert", "hf"] = "bert"
    path: Optional[str] = None
    pooling: Literal["cls", "mean"] = "cls"
    vocab_size: int = 4000
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    max_length: int = 64
    dropout: float = 0.1
    grad_checkpointing: bool = False


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 128


@dataclass
class SourceConfig:
    """One source of the mixed pre-training stream: a split of the manifest used as
    ``paired`` (image + report), ``unpaired`` (image only: report and labels withheld),
    ``labeled`` (image + labels: report withheld) or ``report`` (report + labels, no image:
    a labelled report corpus; only methods that take image-less rows, MedCLIP, accept it)
    samples, drawn with relative ``weight``.
    ``subjects: [lo, hi]`` keeps only the subjects whose hash falls in that part of [0, 1)
    (a deterministic, subject-level subset: complementary ranges of one split give, e.g., a
    10 % paired part and a 90 % unpaired part)."""

    split: str = "train"
    kind: Literal["paired", "unpaired", "labeled", "report"] = "paired"
    weight: float = 1.0
    subjects: list[float] = field(default_factory=lambda: [0.0, 1.0])

    def validate(self, prefix: str) -> None:
        if not self.weight > 0:
            raise ConfigError(f"{prefix}.weight: must be > 0, got {self.weight!r} (drop the source instead)")
        r = self.subjects
        if len(r) != 2 or not 0.0 <= r[0] < r[1] <= 1.0:
            raise ConfigError(f"{prefix}.subjects: must be [lo, hi] with 0 <= lo < hi <= 1, got {r!r} "
                              "(e.g. [0.0, 0.1] for a 10 % subject subset)")


@dataclass
class DataConfig:
    """Where pre-training data come from and how images are preprocessed.

    ``sources`` mixes several splits into one stream (see :mod:`medvlp.data.mixed`); when it
    is empty the stream is ``train_split`` as paired samples. ``paired_labels`` says whether
    paired samples keep the manifest's labels (``manifest``), train without (``none``), or get
    labels from the rule-based report labeler run once on their report text (``labeler``).
    """

    manifest: Optional[str] = None
    train_split: str = "train"
    sources: list[SourceConfig] = field(default_factory=list)
    paired_labels: Literal["manifest", "none", "labeler"] = "manifest"
    val_split: str = "val"
    sections: list[str] = field(default_factory=lambda: ["findings", "impression"])
    mean: float = 0.5
    std: float = 0.25
    pad_to_square: bool = True
    augment: bool = True
    batch_size: int = 64
    # DataLoader worker processes. One worker decodes and augments the next batch while the model
    # trains (data wait < 1 % of a step vs ~12 % in-process; benchmarks/results/data_wait.md). The
    # PNG-folder stream's results do not depend on it (augmentation is seeded per sample); the shard
    # stream assigns samples by worker, so there it is part of the run (docs/data/streaming.md).
    num_workers: int = 1
    # decoded, resized images kept in RAM per process (MiB; 0 = off): read each file once, not once per epoch
    image_cache_mb: float = 0.0
    # train from tar shards (a folder with shards.json, or a dataset folder with shards/): see
    # medvlp.data.stream and docs/data/streaming.md; images are then streamed, never read from the PNG folder
    shards: Optional[str] = None
    shuffle_buffer: int = 1000  # samples per worker mixed by the shard stream's shuffle buffer


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 5e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    precision: Precision = "auto"
    accum_steps: int = 1
    seed: int = 0
    log_every: int = 10
    save_every: int = 0
    keep_checkpoints: int = 2
    output_dir: Optional[str] = None
    threads: int = 0
    progress: bool = True
    tensorboard: bool = True
    # wall-clock budget of the training steps, summed over resumes (0: none); when reached the
    # loop saves a checkpoint and stops early, marking trainer_state.json "time_limited": true
    time_limit_minutes: float = 0.0


@dataclass
class EvalConfig:
    tasks: list[Literal["zeroshot", "retrieval", "retrieval_itm", "linear_probe", "localization", "prompt_tuning", "vqa",
                       "finetune", "segmentation", "detection"]] = field(
        default_factory=lambda: ["zeroshot", "retrieval", "linear_probe"]
    )
    split: str = "test"
    probe_train_split: str = "train"
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    min_positives: int = 2
    probe_seeds: int = 3
    batch_size: int = 128
    prompt_template: str = "{}"
    prompts: Optional[str] = None  # a YAML/JSON prompt file; its classes override the defaults
    # prompt_tuning task (methods with learned prompts): AdamW steps and learning rate of the
    # context vectors, full-batch on each label fraction of the linear probe
    prompt_tuning_steps: int = 100
    prompt_tuning_lr: float = 1e-2
    # segmentation task: decoder on the frozen encoder's tokens, or the encoder fine-tuned with it
    # (layer-wise learning-rate decay as the finetune task; docs/evaluation_dense.md)
    segmentation_encoder: Literal["frozen", "finetune"] = "frozen"
    # retrieval_itm task (methods with an ITM head): the ITC candidates re-ranked per query, and the
    # size of the fixed pool of test pairs scored all against all
    itm_rerank_k: int = 16
    itm_pool_size: int = 256


@dataclass
class MethodConfig:
    """Base of every method's config; each method subclasses it with its own fields."""

    name: str = "clip"


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------- loading


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a YAML file, resolving ``include`` (a path or list of paths) recursively."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (check the path passed to --config)")
    resolved = path.resolve()
    if resolved in _seen:
        raise ConfigError(f"config include cycle: {' -> '.join(map(str, _seen + (resolved,)))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    includes = data.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for inc in includes:
        merged = _deep_merge(merged, load_yaml(path.parent / inc, _seen + (resolved,)))
    return _deep_merge(merged, data)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a raw config dict."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=1e-3)")
        key, value_text = item.split("=", 1)
        try:
            value = yaml.safe_load(value_text)
        except yaml.YAMLError:
            value = value_text
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return raw


# --------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key}: invalid value {value!r}; allowed values: {allowed}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value] if not (isinstance(value, str) and "," in value) else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a raw mapping, validating every key and value."""
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key {key!r}; allowed keys in {where}: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        check(prefix)
    return obj


def _positive(prefix: str, obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{prefix}.{name}: must be > 0, got {getattr(obj, name)!r}")


def _validate_experiment(cfg: ExperimentConfig) -> None:
    v, t, tr = cfg.model.vision, cfg.model.text, cfg.train
    _positive("model.vision", v, "image_size", "patch_size", "width", "depth", "heads", "in_chans")
    if v.image_size % v.patch_size:
        raise ConfigError(
            f"model.vision.image_size ({v.image_size}) must be a multiple of model.vision.patch_size ({v.patch_size})"
        )
    if v.width % v.heads:
        raise ConfigError(f"model.vision.width ({v.width}) must be divisible by model.vision.heads ({v.heads})")
    _positive("model.text", t, "max_length")
    if t.name == "bert":
        _positive("model.text", t, "vocab_size", "width", "depth", "heads")
        if t.width % t.heads:
            raise ConfigError(f"model.text.width ({t.width}) must be divisible by model.text.heads ({t.heads})")
    if t.name == "hf" and not t.path:
        raise ConfigError("model.text.path: required when model.text.name is 'hf' (a Hugging Face model directory)")
    _positive("train", tr, "steps", "lr", "accum_steps", "log_every")
    if tr.time_limit_minutes < 0:
        raise ConfigError(f"train.time_limit_minutes: must be >= 0 (0 means no limit), got {tr.time_limit_minutes}")
    _positive("data", cfg.data, "batch_size", "std", "shuffle_buffer")
    if cfg.data.image_cache_mb < 0:
        raise ConfigError(f"data.image_cache_mb: must be >= 0 (0 turns the cache off), got {cfg.data.image_cache_mb}")
    if not 0 <= tr.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio: must be within [0, 1], got {tr.min_lr_ratio}")
    _positive("eval", cfg.eval, "prompt_tuning_steps", "prompt_tuning_lr")
    if cfg.eval.itm_rerank_k < 10:
        raise ConfigError(f"eval.itm_rerank_k: must be >= 10 (Recall@10 needs the top 10 re-ranked), "
                          f"got {cfg.eval.itm_rerank_k}")
    if cfg.eval.itm_pool_size < 10:
        raise ConfigError(f"eval.itm_pool_size: must be >= 10 test pairs, got {cfg.eval.itm_pool_size}")
    for frac in cfg.eval.fractions:
        if not 0 < frac <= 1:
            raise ConfigError(f"eval.fractions: each fraction must be within (0, 1], got {frac}")
    if cfg.eval.prompt_template.count("{}") != 1:
        raise ConfigError(f"eval.prompt_template: must contain '{{}}' exactly once, got {cfg.eval.prompt_template!r}")
    allowed_sections = ("findings", "impression")
    for sec in cfg.data.sections:
        if sec not in allowed_sections:
            raise ConfigError(f"data.sections: invalid value {sec!r}; allowed values: {', '.join(allowed_sections)}")


def build_config(raw: dict) -> ExperimentConfig:
    """Validate a raw dict (after includes and overrides) into an ExperimentConfig."""
    from medvlp.registry import METHODS

    raw = copy.deepcopy(raw)
    method_raw = raw.pop("method", {}) or {}
    if not isinstance(method_raw, dict):
        raise ConfigError(f"method: expected a mapping with at least 'name', got {method_raw!r}")
    name = method_raw.get("name", "clip")
    if name not in METHODS:
        raise ConfigError(f"method.name: invalid value {name!r}; allowed values: {', '.join(sorted(METHODS))}")
    cfg = from_dict(ExperimentConfig, raw)
    cfg.method = from_dict(METHODS.config_class(name), method_raw, "method")
    _validate_experiment(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    raw = load_yaml(path) if path else {}
    return build_config(apply_overrides(raw, overrides or []))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
