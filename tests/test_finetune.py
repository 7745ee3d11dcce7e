"""Full fine-tuning with layer-wise lr decay: the parameter groups' learning rates by hand; a
visible label is learnt well above chance (a constant predictor scores 0.5); a tiny CLIP end to
end on the tiny SynthCXR fixture, with the evaluated model left unchanged."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medvlp.config import VisionConfig, load_config
from medvlp.data.manifest import read_info, read_manifest
from medvlp.data.sample import NEGATIVE, POSITIVE
from medvlp.data.tokenize import train_wordpiece
from medvlp.errors import EvaluationError
from medvlp.eval.finetune import (
    FinetuneClassifier,
    evaluate_finetune,
    finetune_once,
    llrd_param_groups,
)
from medvlp.eval.linear_probe import fraction_indices
from medvlp.eval.metrics import auroc_per_class
from medvlp.models.vit import VisionTransformer
from tests.conftest import TINY


def _vit():
    return VisionTransformer(VisionConfig(image_size=16, patch_size=8, width=16, depth=2, heads=2))


def test_llrd_groups_by_hand():
    clf = FinetuneClassifier(_vit(), 16, 3)
    groups = llrd_param_groups(clf, lr=1.0, decay=0.5, weight_decay=0.1)
    lr_of = {name: g["lr"] for g in groups for name in g["names"]}
    wd_of = {name: g["weight_decay"] for g in groups for name in g["names"]}
    # depth 2: stem 0.5^3, block 0 0.5^2, block 1 0.5^1, final norm and head 0.5^0
    assert lr_of["encoder.patch_embed.weight"] == 0.125 and lr_of["encoder.cls_token"] == 0.125
    assert lr_of["encoder.blocks.0.attn.qkv.weight"] == 0.25 and lr_of["encoder.blocks.0.norm1.bias"] == 0.25
    assert all(v == 0.5 for k, v in lr_of.items() if k.startswith("encoder.blocks.1."))
    assert lr_of["encoder.norm.weight"] == 1.0 and lr_of["head.weight"] == 1.0 and lr_of["head.bias"] == 1.0
    assert wd_of["head.weight"] == 0.1 and wd_of["head.bias"] == 0.0 and wd_of["encoder.cls_token"] == 0.0
    assert wd_of["encoder.blocks.0.attn.qkv.weight"] == 0.1 and wd_of["encoder.blocks.0.norm1.weight"] == 0.0
    # every trainable parameter is in exactly one group
    assert sorted(lr_of) == sorted(f"encoder.{n}" for n, _ in clf.encoder.named_parameters()) + ["head.bias",
                                                                                                 "head.weight"]


def _visible_labels(n: int, seed: int):
    """Images whose class k is positive show a bright square in quadrant k (the label is visible)."""
    gen = torch.Generator().manual_seed(seed)
    positive = torch.rand(n, 4, generator=gen) < 0.4
    images = 0.1 * torch.randn(n, 1, 16, 16, generator=gen)
    for k, (r, c) in enumerate([(0, 0), (0, 8), (8, 0), (8, 8)]):
        images[:, :, r + 2:r + 6, c + 2:c + 6] += 2.0 * positive[:, k, None, None, None]
    return images, torch.where(positive, POSITIVE, NEGATIVE).long()


def test_visible_label_is_learnt_and_encoder_untouched():
    encoder = _vit()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    train_x, train_y = _visible_labels(96, 0)
    test_x, test_y = _visible_labels(64, 1)
    clf = finetune_once(encoder, train_x, train_y, 4, epochs=20, seed=0, lr=3e-3)
    with torch.no_grad():
        scores = clf(test_x).numpy()
    auroc = auroc_per_class(scores, test_y.numpy(), list("abcd"))["mean"]
    assert auroc > 0.8  # a constant predictor scores 0.5
    assert auroc_per_class(np.zeros_like(scores), test_y.numpy(), list("abcd"))["mean"] == 0.5
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert not torch.equal(clf.encoder.blocks[0].attn.qkv.weight, encoder.blocks[0].attn.qkv.weight)


def test_constant_input_scores_chance():
    """Fine-tuning's constant-predictor check: the model sees one image for every sample, so its
    scores tie and AUROC is exactly 0.5, against > 0.8 for the visible labels above."""
    train_x, train_y = _visible_labels(96, 0)
    test_x, test_y = _visible_labels(64, 1)
    clf = finetune_once(_vit(), torch.zeros_like(train_x), train_y, 4, epochs=5, seed=0, lr=3e-3)
    with torch.no_grad():
        scores = clf(torch.zeros_like(test_x)).numpy()
    assert auroc_per_class(scores, test_y.numpy(), list("abcd"))["mean"] == pytest.approx(0.5)


def test_tiny_clip_end_to_end_on_probe_fractions(tiny_dataset, tmp_path):
    from medvlp.hub import build_method

    cfg = load_config("configs/methods/clip.yaml", [*TINY, f"data.manifest={tiny_dataset}",
                                                     f"train.output_dir={tmp_path / 'run'}"])
    classes = read_info(tiny_dataset)["classes"]
    train, test = read_manifest(tiny_dataset, ["pretrain"]), read_manifest(tiny_dataset, ["test"])
    tok = train_wordpiece([s.text() for s in train], 300)
    model = build_method(cfg, tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = evaluate_finetune(model, train, test, cfg, classes, fractions=(0.25, 1.0), epochs=1, seeds=(0, 1),
                            tokenizer=tok)
    assert set(res["fractions"]) == {"0.25", "1"} and res["seeds"] == [0, 1]
    codes = np.array([s.label_vector(classes) for s in train])
    for seed in (0, 1):  # the linear probe's subsets, seed by seed
        expected = {f: len(i) for f, i in fraction_indices(codes, (0.25, 1.0), cfg.eval.min_positives, seed).items()}
        assert res["fractions"]["0.25"]["n_train"][seed] == expected[0.25] < expected[1.0] == len(train)
    for frac in res["fractions"].values():
        assert 0.0 <= frac["mean"] <= 1.0 and len(frac["per_seed"]) == 2 and set(frac["per_class"]) == set(classes)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fractions_come_from_the_probe_split_files(tiny_dataset, tmp_path):
    """Fine-tuning trains on exactly the samples the linear probe used: seed 0's fractions are read
    from a (hand-written) probe split file, seed 1's are made and written with the probe's function."""
    import json

    from medvlp.eval.linear_probe import write_splits
    from medvlp.hub import build_method

    cfg = load_config("configs/methods/clip.yaml", [*TINY, f"data.manifest={tiny_dataset}",
                                                     f"train.output_dir={tmp_path / 'run'}"])
    classes = read_info(tiny_dataset)["classes"]
    train, test = read_manifest(tiny_dataset, ["pretrain"]), read_manifest(tiny_dataset, ["test"])
    tok = train_wordpiece([s.text() for s in train], 300)
    ids = [s.id for s in train]
    write_splits(tmp_path, 0, {0.25: ids[:5], 1.0: ids}, cfg.eval.min_positives)  # unlike any fresh 25 % subset
    res = evaluate_finetune(build_method(cfg, tok), train, test, cfg, classes, fractions=(0.25, 1.0), epochs=1,
                            seeds=(0, 1), tokenizer=tok, out_dir=tmp_path)
    codes = np.array([s.label_vector(classes) for s in train])
    fresh = fraction_indices(codes, (0.25, 1.0), cfg.eval.min_positives, 1)
    assert res["fractions"]["0.25"]["n_train"] == [5, len(fresh[0.25])]
    written = json.loads((tmp_path / "splits" / "probe_seed1.json").read_text())["fractions"]
    assert written["0.25"] == [ids[i] for i in fresh[0.25]]

    # a split file made under another min_positives is refused, not silently reused
    write_splits(tmp_path, 0, {0.25: ids[:5], 1.0: ids}, cfg.eval.min_positives + 1)
    with pytest.raises(EvaluationError, match=r"probe_seed0\.json: made with eval\.min_positives=.*fresh --out"):
        evaluate_finetune(build_method(cfg, tok), train, test, cfg, classes, fractions=(0.25, 1.0), epochs=1,
                          seeds=(0,), tokenizer=tok, out_dir=tmp_path)


def test_model_without_vision_tower_is_refused(tiny_dataset, tmp_path):
    cfg = load_config("configs/methods/clip.yaml", [*TINY, f"data.manifest={tiny_dataset}"])
    with pytest.raises(EvaluationError, match="no image encoder"):
        evaluate_finetune(torch.nn.Linear(2, 2), [], [], cfg, ["a"])


def test_stale_split_file_stops_the_run_instead_of_skipping_finetune(tiny_dataset, tmp_path):
    """Through the runner (``--tasks finetune`` into an old --out): a split file made under another
    min_positives stops the evaluation; it is not turned into a 'skipped' task."""
    from medvlp.errors import SplitFileError
    from medvlp.eval import runner
    from medvlp.eval.linear_probe import write_splits
    from medvlp.hub import build_method

    cfg = load_config("configs/methods/clip.yaml", [*TINY, f"data.manifest={tiny_dataset}", "eval.tasks=[finetune]",
                                                     f"train.output_dir={tmp_path / 'run'}"])
    train = read_manifest(tiny_dataset, [cfg.eval.probe_train_split])
    tok = train_wordpiece([s.text() for s in train], 300)
    out = tmp_path / "eval"
    write_splits(out, 0, {f: [s.id for s in train] for f in cfg.eval.fractions}, cfg.eval.min_positives + 1)
    with pytest.raises(SplitFileError, match=r"made with eval\.min_positives"):
        runner.evaluate_models({"clip": (build_method(cfg, tok), tok)}, cfg, tiny_dataset, out,
                               pretrain_subjects=None, progress=False)
