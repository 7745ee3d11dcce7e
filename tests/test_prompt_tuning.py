"""Prompt tuning: only the context vectors train (every other parameter bit-for-bit unchanged),
the probe's split files are reused, the model leaves evaluation as it came, and models without
learned prompts are skipped."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from medvlp.data.sample import MISSING, NEGATIVE, POSITIVE
from medvlp.errors import EvaluationError
from medvlp.eval.linear_probe import write_splits
from medvlp.eval.prompt_tuning import (
    evaluate_prompt_tuning,
    supports_prompt_tuning,
    tune_prompts,
)
from tests.test_umcl import _method_and_batch


def _data(method, n, seed):
    """Image embeddings whose labels follow the direction of a fixed random vector per class."""
    g = torch.Generator().manual_seed(seed)
    k = len(method.classes)
    emb = F.normalize(torch.randn(n, 32, generator=g), dim=-1)
    w = torch.randn(32, k, generator=torch.Generator().manual_seed(99))
    codes = torch.where(emb @ w > 0, POSITIVE, NEGATIVE)
    codes[torch.rand(n, k, generator=g) < 0.1] = MISSING
    return emb, codes


@pytest.fixture
def method(tiny_dataset, tmp_path):
    # class-specific contexts: at random initialisation one shared context barely moves 12 classes' scores
    m, _, _ = _method_and_batch(tiny_dataset, tmp_path, "method.class_specific=true")
    return m.eval()


def test_only_the_context_vectors_train(method):
    emb, codes = _data(method, 64, 0)
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    flags = {n: p.requires_grad for n, p in method.named_parameters()}
    losses = tune_prompts(method, emb, codes, method.classes, steps=30, lr=0.1, logit_scale=50.0)
    assert losses[-1] < 0.95 * losses[0]
    changed = [n for n, p in method.named_parameters() if not torch.equal(p, before[n])]
    assert changed == ["prompt_learner.ctx"]
    assert {n: p.requires_grad for n, p in method.named_parameters()} == flags
    assert all(p.grad is None for p in method.parameters())


def test_evaluate_reuses_the_probe_splits_and_restores_the_model(method, tmp_path):
    classes = list(method.classes)
    train_emb, train_codes = _data(method, 80, 1)
    test_emb, test_codes = _data(method, 40, 2)
    ids = [f"s{i}" for i in range(80)]
    write_splits(tmp_path, 0, {0.1: ids[:9], 1.0: ids}, 1)  # a probe split file that differs from a fresh one
    ctx0 = method.prompt_learner.ctx.detach().clone()
    res = evaluate_prompt_tuning(method, train_emb, train_codes, ids, test_emb, test_codes, classes, [0.1, 1.0], 1,
                                 2, tmp_path, steps=30, lr=0.1, logit_scale=50.0)
    assert torch.equal(method.prompt_learner.ctx, ctx0)
    f01, f1 = res["fractions"]["0.1"], res["fractions"]["1"]
    assert f01["n_train"][0] == 9 and f1["n_train"] == [80, 80]  # seed 0 from the file
    assert (tmp_path / "splits" / "probe_seed1.json").is_file()  # seed 1 made and written
    assert sorted(json.loads((tmp_path / "splits" / "probe_seed1.json").read_text())["fractions"]["1"]) == sorted(ids)
    assert 0.6 < f1["mean"] <= 1.0  # the labels are linear in the embeddings: tuning finds them
    assert set(f1["per_class"]) == set(classes) and res["not_scored"] == []
    assert all(first > last for first, last in f1["loss_first_last"])


def test_constant_image_embeddings_score_chance(method, tmp_path):
    """Prompt tuning's constant-predictor check: one embedding for every image gives tied scores
    (AUROC exactly 0.5), where informative embeddings score above 0.6 (test above)."""
    classes = list(method.classes)
    train_emb, train_codes = _data(method, 80, 1)
    test_emb, test_codes = _data(method, 40, 2)
    const = F.normalize(torch.ones(1, train_emb.shape[1]), dim=-1)
    res = evaluate_prompt_tuning(method, const.expand_as(train_emb).clone(), train_codes, [f"s{i}" for i in range(80)],
                                 const.expand_as(test_emb).clone(), test_codes, classes, [1.0], 1, 1, tmp_path,
                                 steps=10, lr=0.1, logit_scale=50.0)
    assert res["fractions"]["1"]["mean"] == pytest.approx(0.5)


def test_models_without_learned_prompts_are_refused(tiny_dataset, tmp_path):
    from medvlp.config import load_config
    from medvlp.hub import build_method
    from tests.conftest import TINY
    from tests.test_train import _one_batch

    cfg = load_config("configs/methods/clip.yaml", [*TINY, f"data.manifest={tiny_dataset}"])
    tok, _ = _one_batch(cfg)
    clip = build_method(cfg, tok)
    assert not supports_prompt_tuning(clip)
    with pytest.raises(EvaluationError, match="no learned prompts"):
        tune_prompts(clip, torch.zeros(2, 32), torch.zeros(2, 12, dtype=torch.long), ["a"], steps=1, lr=1.0,
                     logit_scale=1.0)
