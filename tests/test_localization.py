"""Localisation score: pointing game, IoU@top-k% and their chance levels against hand-computed
cases; masks at patch resolution; a constant map scores chance and a mask-built oracle scores
1.0 on the tiny dataset; models without patch embeddings are skipped; the CLI task end to end."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medvlp.cli import main
from medvlp.config import load_config
from medvlp.data.loader import make_loader
from medvlp.data.manifest import read_info, read_manifest
from medvlp.data.sample import POSITIVE
from medvlp.data.synth.generator import decode_mask
from medvlp.data.tokenize import train_wordpiece
from medvlp.eval.localization import (
    LocalizationSkipped,
    chance_iou,
    class_word_weights,
    evaluate_localization,
    mask_to_patches,
    pointing_game,
    topk_iou,
    word_attention_maps,
)
from medvlp.eval.prompts import load_prompts
from tests.conftest import TINY


def test_pointing_game_by_hand_ties_split():
    heat = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    inside = torch.tensor([[False, True, False, False], [True, False, False, False], [True, False, False, False]])
    assert pointing_game(heat, inside).tolist() == [1.0, 0.5, 0.25]


def test_topk_iou_by_hand():
    heat = torch.tensor([[9.0, 8.0, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 7.0, 9.0]])
    inside = torch.zeros(2, 10, dtype=torch.bool)
    inside[0, [0, 2]] = True  # top 2 = {0, 1}: IoU 1/3
    inside[1, [8, 9]] = True  # top 2 = {8, 9}: IoU 1
    torch.testing.assert_close(topk_iou(heat, inside, 0.2), torch.tensor([1 / 3, 1.0]))


def test_chance_iou_by_hand_and_by_sampling():
    # n 4, k 2, mask 1: P(hit) = 1/2, IoU 1/2 when hit -> 1/4; mask 2: j ~ {0: 1/6, 1: 4/6, 2: 1/6}
    expected = torch.tensor([0.25, 4 / 6 * (1 / 3) + 1 / 6 * 1.0], dtype=torch.float64)
    torch.testing.assert_close(chance_iou(4, torch.tensor([1, 2]), 0.5), expected)
    # a constant map (random tie-breaking) and random maps both land on chance
    gen = torch.Generator().manual_seed(123)  # not the tie-breaking seed 0: its draws would match
    inside = torch.rand(4000, 64, generator=gen) < torch.rand(4000, 1, generator=gen) * 0.5
    inside[:, 0] = True
    chance = chance_iou(64, inside.sum(1)).mean().item()
    assert topk_iou(torch.zeros(4000, 64), inside).mean().item() == pytest.approx(chance, abs=0.01)
    assert topk_iou(torch.randn(4000, 64, generator=gen), inside).mean().item() == pytest.approx(chance, abs=0.01)
    area = inside.float().mean(1).mean().item()
    assert pointing_game(torch.randn(4000, 64, generator=gen), inside).mean().item() == pytest.approx(area, abs=0.02)


def test_mask_to_patches_dilates_and_pads():
    m = np.zeros((1, 8, 8), bool)
    m[0, 5, 2] = True  # one pixel -> patch (2, 1) of a 4 x 4 grid
    assert mask_to_patches(m, 4)[0].nonzero().flatten().tolist() == [9]
    wide = np.zeros((1, 4, 8), bool)
    wide[0, 0, 0] = True  # padded to 8 x 8 with 2 rows on top: pixel (2, 0) -> patch (1, 0)
    assert mask_to_patches(wide, 4)[0].nonzero().flatten().tolist() == [4]


def test_word_attention_maps_by_hand():
    patches = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1, N 2, D 2)
    words = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # word 0 matches patch 0, word 1 patch 1
    # sharpen ln 3: softmax([ln 3, 0]) = [3/4, 1/4]; class 0 = word 0, class 1 = both words equally
    maps = word_attention_maps(patches, words, torch.tensor([[1.0, 0.0], [0.5, 0.5]]), sharpen=math.log(3))
    torch.testing.assert_close(maps, torch.tensor([[[0.75, 0.25], [0.5, 0.5]]]))


def test_class_word_weights_by_hand():
    # class 0: prompts of 2 and 1 words; class 1: one of 3; class 2: an empty prompt and one of 4
    w = class_word_weights([[2, 1], [3], [0, 4]])
    expected = torch.zeros(3, 10)
    expected[0, :2], expected[0, 2] = 0.25, 0.5
    expected[1, 3:6] = 1 / 3
    expected[2, 6:10] = 0.25
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(w.sum(1), torch.ones(3))


# ------------------------------------------------------------------ the task on the tiny dataset
def _setup(tiny_dataset, tmp_path):
    cfg = load_config("configs/experiments/demo.yaml", [*TINY, f"data.manifest={tiny_dataset}",
                                                         f"train.output_dir={tmp_path / 'run'}"])
    classes = read_info(tiny_dataset)["classes"]
    prompts = load_prompts(None, classes)
    slot = {t: k for k, c in enumerate(classes) for t in prompts[c]["positive"]}
    slot.update({t: len(classes) + k for k, c in enumerate(classes) for t in prompts[c]["negative"]})
    dim = 2 * len(classes) + 1

    def encode_text(texts):  # positive prompts of class k -> e_k (no template: cfg.eval.prompt_template unused)
        return F.one_hot(torch.tensor([slot[t] for t in texts]), dim).float()

    def encode_words(texts):  # every prompt of class k: two words, both e_k
        return [encode_text([t]).expand(2, dim) for t in texts]

    encode_text.words = encode_words

    tok = train_wordpiece(["the lungs are clear."], 64)  # the loader tokenises the reports too
    return cfg, classes, prompts, encode_text, dim, read_manifest(tiny_dataset, ["test"]), tok


class _Model:
    def __init__(self, fn):
        self.patch_embeddings = fn


def test_constant_map_scores_chance_and_oracle_scores_one(tiny_dataset, tmp_path):
    cfg, classes, prompts, encode_text, dim, test, tok = _setup(tiny_dataset, tmp_path)
    grid = cfg.model.vision.image_size // cfg.model.vision.patch_size
    const = _Model(lambda images: F.normalize(torch.ones(len(images), grid * grid, dim), dim=-1))
    res = evaluate_localization(const, tok, test, cfg, classes, encode_text, prompts, tiny_dataset,
                                encode_words=encode_text.words)
    assert res["grid"] == grid and sum(res["n_pairs"].values()) >= 5
    for c, v in res["pointing_game"]["per_class"].items():
        assert v == pytest.approx(res["chance"]["pointing_game"]["per_class"][c])
        assert res["words"]["pointing_game"]["per_class"][c] == pytest.approx(v)  # uniform attention: chance too

    # the oracle: each patch embeds the classes whose mask covers it (read from the mask files)
    oracle_by_image = {}
    loader = make_loader(test, cfg, tok, classes, batch_size=64)
    by_id = {s.id: s for s in test}
    for batch in loader:
        for img, sid in zip(batch.images, batch.ids):
            s = by_id[sid]
            if not s.meta.get("mask"):
                continue
            masks = decode_mask(tiny_dataset / s.meta["mask"], classes)
            inside = mask_to_patches(np.stack([masks[c] for c in classes]), grid).float()  # (K, N)
            inside *= torch.tensor([s.labels.get(c) == POSITIVE for c in classes]).float()[:, None]
            emb = torch.cat([inside.t(), torch.zeros(grid * grid, len(classes)), 0.01 * torch.ones(grid * grid, 1)], 1)
            oracle_by_image[img.numpy().tobytes()] = F.normalize(emb, dim=-1)
    oracle = _Model(lambda images: torch.stack([oracle_by_image[x.numpy().tobytes()] for x in images]))
    res = evaluate_localization(oracle, tok, test, cfg, classes, encode_text, prompts, tiny_dataset,
                                encode_words=encode_text.words)
    assert res["pointing_game"]["mean"] == 1.0
    assert res["iou_topk"]["mean"] > res["chance"]["iou_topk"]["mean"]
    assert res["words"]["pointing_game"]["mean"] == 1.0
    assert res["words"]["iou_topk"]["mean"] == pytest.approx(res["iou_topk"]["mean"])  # same ranking of patches


def test_models_without_patch_embeddings_are_skipped(tiny_dataset, tmp_path):
    cfg, classes, prompts, encode_text, _, test, tok = _setup(tiny_dataset, tmp_path)
    with pytest.raises(LocalizationSkipped, match="returns None"):
        evaluate_localization(_Model(lambda images: None), tok, test, cfg, classes, encode_text, prompts, tiny_dataset)
    with pytest.raises(LocalizationSkipped, match="no test image has a finding mask"):
        no_masks = [replace(s, meta={k: v for k, v in s.meta.items() if k != "mask"}) for s in test]
        evaluate_localization(_Model(lambda images: None), tok, no_masks, cfg, classes, encode_text, prompts,
                              tiny_dataset)


def test_word_encoder_keeps_only_the_prompts_own_words(tiny_dataset, tmp_path):
    from medvlp.eval.runner import make_word_encoder

    cfg, *_ = _setup(tiny_dataset, tmp_path)
    cfg = replace(cfg, eval=replace(cfg.eval, prompt_template="IMPRESSION: {}"))
    tok = train_wordpiece(["impression: small right pleural effusion.", "no pneumothorax"] * 4, 200)

    class OneHotWords:  # each token embeds its own id, so the kept rows name the kept tokens
        def word_embeddings(self, input_ids, attention_mask):
            return F.one_hot(input_ids, len(tok)).float()

    kept = make_word_encoder(OneHotWords(), tok, cfg)(["small right pleural effusion", "no pneumothorax"])
    for emb, prompt in zip(kept, ["small right pleural effusion", "no pneumothorax"]):
        own = tok(prompt, add_special_tokens=False)["input_ids"]
        assert emb.argmax(1).tolist() == own  # no [CLS], [SEP], padding or template words

    class NoWords:
        def word_embeddings(self, input_ids, attention_mask):
            return None

    cfg2, classes, prompts, encode_text, dim, test, tok2 = _setup(tiny_dataset, tmp_path)
    grid = cfg2.model.vision.image_size // cfg2.model.vision.patch_size
    const = _Model(lambda images: F.normalize(torch.ones(len(images), grid * grid, dim), dim=-1))
    res = evaluate_localization(const, tok2, test, cfg2, classes, encode_text, prompts, tiny_dataset,
                                encode_words=make_word_encoder(NoWords(), tok2, cfg2))
    assert "words" not in res and "returns None" in res["words_skipped"]


def test_cli_task_end_to_end(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", "configs/methods/clip.yaml", *TINY, f"data.manifest={tiny_dataset}",
                 f"train.output_dir={run}", "data.train_split=pretrain", "train.steps=2"]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--out", str(out), "--tasks", "localization"]) == 0
    loc = json.loads((out / "metrics.json").read_text())["run"]["localization"]
    assert set(loc["pointing_game"]["per_class"]) == set(loc["n_pairs"]) and "No Finding" not in loc["n_pairs"]
    for metric in ("pointing_game", "iou_topk"):
        assert 0.0 <= loc[metric]["mean"] <= 1.0 and 0.0 < loc["chance"][metric]["mean"] < 1.0
    assert loc["top_fraction"] == 0.1 and loc["grid"] == 4
    for metric in ("pointing_game", "iou_topk"):  # CLIP's projected tokens give the word map too
        assert 0.0 <= loc["words"][metric]["mean"] <= 1.0
        assert set(loc["words"][metric]["per_class"]) == set(loc["n_pairs"])


@pytest.mark.parametrize("recipe", ["mpma", "maskedclip"])
def test_masked_family_dual_encoders_expose_patch_embeddings(recipe, tiny_dataset, tmp_path):
    from medvlp.hub import build_method
    from tests.conftest import TINY

    cfg = load_config(f"configs/methods/{recipe}.yaml", [*TINY, f"data.manifest={tiny_dataset}",
                                                          f"train.output_dir={tmp_path}"])
    tok = train_wordpiece(["small right pleural effusion", "no acute findings"] * 4, 300)
    model = build_method(cfg, tok).eval()
    emb = model.patch_embeddings(torch.randn(2, 1, 32, 32))
    assert emb.shape == (2, 16, cfg.model.embed_dim)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2, 16), atol=1e-5)
