"""Checkpoints: safetensors weights + JSON, written atomically, nothing pickled.

A checkpoint is a folder that is also a complete model bundle::

    model.safetensors        every weight of the method (shared tensors handled)
    config.json              medvlp version, the full experiment config, preprocessing, classes
    tokenizer/               the tokenizer the text encoder was trained with
    text_config/             the Hugging Face config that rebuilds the text encoder
    pretrain_subjects.json   SHA-256 of each pre-training subject id (evaluation's overlap check)
    optimizer.safetensors    optimizer state tensors   } only in training checkpoints;
    trainer_state.json       step, data position, optimizer hyper-parameters, scheduler
                             }  ``--resume`` continues exactly from them

It is written into a temporary sibling folder and renamed into place, so a crash while
saving never leaves a half-written checkpoint under the final name.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from medvlp import __version__
from medvlp.config import to_dict
from medvlp.data.sample import hash_subject
from medvlp.errors import CheckpointError

CKPT_DIR = "checkpoints"


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, meta = {}, {}
    for pid, state in sd["state"].items():
        meta[str(pid)] = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                meta[str(pid)][key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": meta}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {int(pid): dict(vals) for pid, vals in meta["scalars"].items()}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module, cfg, tokenizer, classes: list[str],
                    preprocess: dict, pretrain_subjects: Iterable[str] = (), pretrain_images: Iterable[str] = (),
                    optimizer=None, scheduler=None,
                    trainer_state: dict | None = None) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt", "medvlp": __version__})
    config = {"medvlp_version": __version__, "experiment": to_dict(cfg), "preprocess": preprocess, "classes": list(classes)}
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    text = getattr(model, "text", None)
    if text is not None and hasattr(text, "save_config"):
        text.save_config(tmp / "text_config")
    hashes = sorted({hash_subject(s) for s in pretrain_subjects})
    # Image hashes (SHA-256 of pixels, from the manifest) let evaluation refuse duplicates of
    # pre-training images in a test split even under other subject ids.
    images = sorted(set(pretrain_images))
    (tmp / "pretrain_subjects.json").write_text(json.dumps({"sha256": hashes, "image_sha256": images}) + "\n")
    if optimizer is not None:
        tensors, meta = _optimizer_to_files(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = dict(trainer_state or {}, optimizer=meta, scheduler=scheduler.state_dict() if scheduler else None)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
    old = path.with_name(path.name + ".old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)
    return path


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    file = Path(path) / "model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{file} not found: {path} is not a medvlp checkpoint folder")
    missing, unexpected = load_model(model, str(file), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{file} does not match the model built from its config.json: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )


def load_training_state(path: str | os.PathLike, optimizer, scheduler) -> dict:
    path = Path(path)
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{state_file} not found: {path} holds weights only and cannot be resumed")
    state = json.loads(state_file.read_text())
    optimizer.load_state_dict(_optimizer_from_files(load_file(str(path / "optimizer.safetensors")), state.pop("optimizer")))
    sched = state.pop("scheduler")
    if scheduler is not None and sched is not None:
        scheduler.load_state_dict(sched)
    return state


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    folder = Path(run_dir) / CKPT_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_") and "." not in p.name)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
