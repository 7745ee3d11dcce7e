"""GLoRIA and MGCA recipes (global InfoNCE + local alignment; MGCA adds prototypes): the local
terms get the projected word and patch tokens with the configured constants, MGCA's token
importance is the heads-mean [CLS] attention (detached or not), prototypes, the weighted sum,
gradients, overfitting, config errors, and pretrain + evaluate (with localisation)."""
from __future__ import annotations

import json

import pytest
import torch

import medvlp.methods.gloria as gloria_module
import medvlp.methods.mgca as mgca_module
from medvlp.cli import main
from medvlp.config import load_config
from medvlp.errors import ConfigError
from medvlp.hub import build_method
from medvlp.losses.local import gloria_local_loss, mgca_local_loss
from medvlp.methods.gloria import report_words
from tests.conftest import TINY
from tests.test_train import _one_batch

RECIPES = ["gloria", "mgca"]


def _method_and_batch(dataset, tmp_path, recipe, *extra):
    cfg = load_config(f"configs/methods/{recipe}.yaml", [
        *TINY, f"data.manifest={dataset}", f"train.output_dir={tmp_path / 'run'}", "data.train_split=train",
        "model.text.dropout=0.0", *extra])
    tok, batch = _one_batch(cfg)
    torch.manual_seed(0)
    return build_method(cfg, tok), batch


def _spy(monkeypatch, module, name, real):
    seen = {}

    def spy(words, word_mask, patches, **kw):
        seen.update(words=words, word_mask=word_mask, patches=patches, **kw)
        seen["value"] = real(words, word_mask, patches, **kw)
        return seen["value"]

    monkeypatch.setattr(module, name, spy)
    return seen


def test_report_words_cut_after_the_last_word():
    class B:
        word_ids = torch.tensor([[-1, 0, 1, -1, -1, -1], [-1, 0, 0, 1, 2, -1]])

    tokens = torch.arange(12.0).view(2, 6, 1)
    words, mask = report_words(B, tokens)
    assert words.shape == (2, 5, 1) and mask.tolist() == [[False, True, True, False, False],
                                                          [False, True, True, True, True]]


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_parameter_gets_a_gradient(tiny_dataset, tmp_path, recipe):
    method, batch = _method_and_batch(tiny_dataset, tmp_path, recipe)
    out = method(batch)
    expected = {"loss", "loss_global", "loss_local", "logit_scale"} | ({"loss_proto"} if recipe == "mgca" else set())
    assert set(out) == expected
    out["loss"].backward()
    missing = [n for n, p in method.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_gloria_local_term_and_weights(tiny_dataset, tmp_path, monkeypatch):
    method, batch = _method_and_batch(tiny_dataset, tmp_path, "gloria", "method.local_weight=0.3",
                                      "method.local_sharpen=2", "method.local_agg=3", "method.local_scale=7")
    seen = _spy(monkeypatch, gloria_module, "gloria_local_loss", gloria_local_loss)
    out = method(batch)
    assert (seen["sharpen"], seen["agg"], seen["scale"]) == (2.0, 3.0, 7.0)
    text = method.text(batch.input_ids, batch.attention_mask)
    tokens, mask = report_words(batch, text.tokens)
    torch.testing.assert_close(seen["words"], method.text_proj(tokens))
    assert torch.equal(seen["word_mask"], mask) and not seen["word_mask"][:, 0].any()  # no [CLS]
    torch.testing.assert_close(seen["patches"], method.image_proj(method.vision(batch.images).tokens))
    torch.testing.assert_close(out["loss"], out["loss_global"] + 0.3 * out["loss_local"])


@pytest.mark.parametrize("detach", [True, False])
def test_mgca_importance_is_the_heads_mean_cls_attention(tiny_dataset, tmp_path, monkeypatch, detach):
    method, batch = _method_and_batch(tiny_dataset, tmp_path, "mgca", "method.local_tau=0.2",
                                      f"method.detach_importance={str(detach).lower()}")
    seen = _spy(monkeypatch, mgca_module, "mgca_local_loss", mgca_local_loss)
    method(batch)
    text = method.text(batch.input_ids, batch.attention_mask, return_attention=True)
    vision = method.vision(batch.images, return_attention=True)
    length = seen["words"].shape[1]
    torch.testing.assert_close(seen["word_importance"], text.cls_attention.mean(1)[:, :length])
    torch.testing.assert_close(seen["patch_importance"], vision.cls_attention.mean(1))
    assert seen["tau"] == 0.2
    assert seen["word_importance"].requires_grad is not detach and seen["patch_importance"].requires_grad is not detach


def test_mgca_prototypes_and_weights(tiny_dataset, tmp_path):
    method, batch = _method_and_batch(tiny_dataset, tmp_path, "mgca")
    assert method.prototypes.shape == (8, 32)  # min(500, data.batch_size)
    out = method(batch)
    torch.testing.assert_close(out["loss"], out["loss_global"] + 0.7 * out["loss_local"] + 0.5 * out["loss_proto"])
    method, _ = _method_and_batch(tiny_dataset, tmp_path, "mgca", "method.num_prototypes=5")
    assert method.prototypes.shape == (5, 32)
    too_many, _ = _method_and_batch(tiny_dataset, tmp_path, "mgca", "method.num_prototypes=9")  # batch 8, 1 rank
    with pytest.raises(ConfigError, match=r"method.num_prototypes: 9 prototypes but the global batch has 8 rows"):
        too_many.train()(batch)
    too_many.eval()(batch)  # a checkpoint trained on more ranks still loads and runs on one
    method, _ = _method_and_batch(tiny_dataset, tmp_path, "mgca", "method.proto_weight=0")
    assert method.prototypes is None and "loss_proto" not in method(batch)


def test_mgca_prototype_term_is_swapped_prediction_of_sinkhorn_codes(tiny_dataset, tmp_path):
    from medvlp.losses.prototypes import sinkhorn, swapped_prediction_loss

    method, batch = _method_and_batch(tiny_dataset, tmp_path, "mgca", "method.local_weight=0")
    out = method(batch)
    img = method.encode_image(batch.images)
    txt = method.encode_text(batch.input_ids, batch.attention_mask)
    protos = torch.nn.functional.normalize(method.prototypes, dim=-1)
    si, st = img @ protos.t(), txt @ protos.t()
    expected = swapped_prediction_loss(si, st, sinkhorn(si), sinkhorn(st), temperature=0.2)
    torch.testing.assert_close(out["loss_proto"], expected)


@pytest.mark.parametrize("recipe", RECIPES)
def test_overfits_one_batch(tiny_dataset, tmp_path, recipe):
    method, batch = _method_and_batch(tiny_dataset, tmp_path, recipe)
    opt = torch.optim.AdamW(method.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = method(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize("recipe, override, key", [
    ("gloria", "method.global_weight=0", "method.global_weight"),
    ("gloria", "method.local_weight=-1", "method.local_weight"),
    ("gloria", "method.local_sharpen=0", "method.local_sharpen"),
    ("gloria", "method.init_temperature=2", "method.init_temperature"),
    ("mgca", "method.local_tau=0", "method.local_tau"),
    ("mgca", "method.num_prototypes=1", "method.num_prototypes"),
    ("mgca", "method.sinkhorn_iters=0", "method.sinkhorn_iters"),
    ("mgca", "method.sinkhorn_eps=-0.1", "method.sinkhorn_eps"),
    ("mgca", "method.proto_weight=-1", "method.proto_weight"),
])
def test_bad_config_names_the_key(tiny_dataset, tmp_path, recipe, override, key):
    with pytest.raises(ConfigError, match=key):
        _method_and_batch(tiny_dataset, tmp_path, recipe, override)


@pytest.mark.parametrize("recipe", RECIPES)
def test_pretrain_then_evaluate(tiny_dataset, tmp_path, recipe):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", f"configs/methods/{recipe}.yaml", *TINY, f"data.manifest={tiny_dataset}",
                 f"train.output_dir={run}", "data.train_split=pretrain", "train.steps=3"]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--out", str(out), "--tasks", "zeroshot,retrieval,linear_probe,localization"]) == 0
    m = json.loads((out / "metrics.json").read_text())["run"]
    assert not m["meta"].get("skipped_tasks") and {"zeroshot", "retrieval", "linear_probe", "localization"} <= set(m)
    assert 0.0 <= m["localization"]["pointing_game"]["mean"] <= 1.0
    # the word-level map (the token-patch attention the local terms train) and its table columns
    from medvlp.bench import extract_metrics

    flat = extract_metrics(m)
    assert flat["pointing_game_words"] == m["localization"]["words"]["pointing_game"]["mean"]
    assert 0.0 <= flat["iou_top10_words"] <= 1.0
