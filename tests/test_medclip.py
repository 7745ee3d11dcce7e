"""MedCLIP recipe: equals CLIP when every label vector differs (and without labels), image-label
samples train, gradients, overfitting, config errors, pretrain + evaluate end to end."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from medvlp.cli import main
from medvlp.config import load_config
from medvlp.data.manifest import read_info
from medvlp.data.mixed import MixedStream, read_sources
from medvlp.data.sample import MISSING, NEGATIVE, POSITIVE, UNCERTAIN
from medvlp.data.tokenize import train_wordpiece
from medvlp.data.transforms import Preprocess
from medvlp.errors import ConfigError
from medvlp.hub import build_method
from medvlp.losses.contrastive import info_nce
from medvlp.methods.medclip import pair_columns
from tests.conftest import TINY
from tests.test_train import _one_batch

RECIPE = "configs/methods/medclip.yaml"
MIX = "data.sources=[{split: pretrain, kind: paired, weight: 3}, {split: pretrain-labeled, kind: labeled, weight: 1}]"


def _cfg(dataset, tmp_path, *extra, recipe=RECIPE):
    return load_config(recipe, [*TINY, f"data.manifest={dataset}", f"train.output_dir={tmp_path / 'run'}",
                                "data.train_split=train", "model.text.dropout=0.0", *extra])


def _paired(dataset, tmp_path, *extra):
    cfg = _cfg(dataset, tmp_path, *extra)
    tok, batch = _one_batch(cfg)
    torch.manual_seed(0)
    return build_method(cfg, tok), batch, tok


def _mixed(dataset, tmp_path, *extra):
    """A method and one batch of 8 from the real stream: 6 paired, then 2 image-label samples."""
    cfg = _cfg(dataset, tmp_path, MIX, *extra)
    sources = read_sources(cfg)
    tok = train_wordpiece([s.text() for src in sources if src.kind == "paired" for s in src.samples], 300)
    stream = MixedStream(sources, Preprocess.from_config(cfg), tok, read_info(dataset)["classes"], batch_size=8,
                         max_length=48, sections=cfg.data.sections, seed=0, augment=False)
    batch = next(iter(stream))
    torch.manual_seed(0)
    return build_method(cfg, tok), batch


def _clip_twin(method, dataset, tmp_path, tok):
    clip = build_method(_cfg(dataset, tmp_path, recipe="configs/methods/clip.yaml"), tok)
    clip.load_state_dict(method.state_dict())
    return clip


def test_pair_columns():
    assert pair_columns(torch.tensor([True, False, True, True, False])).tolist() == [0, -1, 1, 2, -1]


def test_equals_clip_when_all_label_vectors_differ(tiny_dataset, tmp_path):
    method, batch, tok = _paired(tiny_dataset, tmp_path, "method.tau_t=0.01")
    b, k = batch.labels.shape
    assert b <= k
    labels = torch.full((b, k), NEGATIVE)
    labels[torch.arange(b), torch.arange(b)] = POSITIVE  # distinct (orthogonal) label vectors
    labels[0, k - 1] = UNCERTAIN  # uncertain counts as not positive: still orthogonal
    batch = replace(batch, labels=labels)
    clip = _clip_twin(method, tiny_dataset, tmp_path, tok)
    torch.testing.assert_close(method(batch)["loss"], clip(batch)["loss"], rtol=1e-5, atol=1e-6)


def test_equals_clip_without_labels(tiny_dataset, tmp_path):
    method, batch, tok = _paired(tiny_dataset, tmp_path)
    batch = replace(batch, labels=torch.full_like(batch.labels, MISSING))  # one-hot fallback at any tau_t
    clip = _clip_twin(method, tiny_dataset, tmp_path, tok)
    torch.testing.assert_close(method(batch)["loss"], clip(batch)["loss"], rtol=1e-5, atol=1e-6)


def test_soft_targets_wiring_on_a_mixed_batch(tiny_dataset, tmp_path, monkeypatch):
    method, batch = _mixed(tiny_dataset, tmp_path, "method.tau_t=0.2")
    seen = {}
    import medvlp.methods.medclip as medclip_module

    def spy(img, txt, scale, img_codes, txt_codes, pair, **kw):
        seen.update(img=img, txt=txt, img_codes=img_codes, txt_codes=txt_codes, pair=pair, **kw)
        return img.sum() * 0.0 + txt.sum() * 0.0

    monkeypatch.setattr(medclip_module, "label_contrastive_loss", spy)
    method(batch)
    assert seen["img"].shape == (8, 32) and seen["txt"].shape == (6, 32)  # rectangular: 8 images x 6 reports
    assert seen["pair"].tolist() == [0, 1, 2, 3, 4, 5, -1, -1]
    assert torch.equal(seen["img_codes"], batch.labels) and torch.equal(seen["txt_codes"], batch.labels[:6])
    assert seen["mode"] == "soft" and seen["tau_t"] == 0.2
    # identical-report mask: image i's own report vs every column; image-only rows match nothing
    assert seen["same"].shape == (8, 6) and not seen["same"][6:].any()
    assert bool(seen["same"][torch.arange(6), torch.arange(6)].all())


def test_image_label_samples_contribute_gradient(tiny_dataset, tmp_path):
    method, batch = _mixed(tiny_dataset, tmp_path)
    image_only = ~batch.has_text
    assert image_only.tolist() == [False] * 6 + [True] * 2 and bool(batch.has_labels[image_only].all())
    images = batch.images.clone().requires_grad_(True)
    out = method(replace(batch, images=images))
    assert out["n_image_label"].item() == 2
    out["loss"].backward()
    per_sample = images.grad.abs().flatten(1).sum(1)
    assert bool((per_sample[image_only] > 0).all())


def test_without_labels_image_only_rows_are_only_negatives(tiny_dataset, tmp_path):
    # no labels anywhere: the rectangular one-hot InfoNCE (image-only rows are extra negatives
    # of the text->image term and have no image->text target)
    method, batch = _mixed(tiny_dataset, tmp_path, "method.mask_identical_texts=false")
    batch = replace(batch, labels=torch.full_like(batch.labels, MISSING))
    img = method.encode_image(batch.images)
    txt = method.encode_text(batch.input_ids[:6], batch.attention_mask[:6])
    expected = info_nce(img, txt, method.scale(), labels=torch.tensor([0, 1, 2, 3, 4, 5, -1, -1]))
    torch.testing.assert_close(method(batch)["loss"], expected, rtol=1e-5, atol=1e-6)


REPORTS = ("data.sources=[{split: pretrain, kind: paired, weight: 2}, {split: pretrain-labeled, kind: labeled, weight: 1},"
           " {split: train, kind: report, weight: 1}]")


def _with_reports(dataset, tmp_path):
    """A method and one batch of 8: 4 paired, 2 image-label and 2 report-only (no image) samples."""
    cfg = _cfg(dataset, tmp_path, REPORTS)
    sources = read_sources(cfg)
    tok = train_wordpiece([s.text() for src in sources if src.kind in ("paired", "report") for s in src.samples], 300)
    stream = MixedStream(sources, Preprocess.from_config(cfg), tok, read_info(dataset)["classes"], batch_size=8,
                         max_length=48, sections=cfg.data.sections, seed=0, augment=False)
    torch.manual_seed(0)
    return build_method(cfg, tok), next(iter(stream))


def test_report_only_samples_are_columns_without_rows(tiny_dataset, tmp_path, monkeypatch):
    method, batch = _with_reports(tiny_dataset, tmp_path)
    assert batch.has_image.tolist() == [True] * 6 + [False] * 2
    assert batch.has_text.tolist() == [True] * 4 + [False] * 2 + [True] * 2
    assert batch.paired.tolist() == [True] * 4 + [False] * 4
    assert bool(batch.has_labels[6:].all()) and not batch.images[6:].any()  # labelled reports, zero images
    import medvlp.methods.medclip as medclip_module
    from medvlp.losses.soft_contrastive import label_contrastive_loss

    seen, encoded = {}, []
    real_encode = method.encode_image

    def spy(img, txt, scale, img_codes, txt_codes, pair, **kw):
        seen.update(img=img, txt=txt, img_codes=img_codes, txt_codes=txt_codes, pair=pair, **kw)
        return label_contrastive_loss(img, txt, scale, img_codes, txt_codes, pair, **kw)

    def encode_spy(images):
        encoded.append(images.shape[0])
        return real_encode(images)

    monkeypatch.setattr(medclip_module, "label_contrastive_loss", spy)
    monkeypatch.setattr(method, "encode_image", encode_spy)
    out = method(batch)
    assert encoded == [6]  # the report-only rows' zero images are never encoded
    assert seen["img"].shape == (6, 32) and seen["txt"].shape == (6, 32)  # 6 images x (4 paired + 2 report) texts
    assert seen["pair"].tolist() == [0, 1, 2, 3, -1, -1]
    assert torch.equal(seen["img_codes"], batch.labels[:6])
    assert torch.equal(seen["txt_codes"], batch.labels[[0, 1, 2, 3, 6, 7]])
    assert out["n_report_only"].item() == 2 and out["n_image_label"].item() == 2

    # the report-only texts train the text tower: their token embeddings get a gradient
    emb = method.text.get_input_embeddings().weight
    method.zero_grad()
    out["loss"].backward()
    report_tokens = set(batch.input_ids[6:][batch.attention_mask[6:].bool()].tolist())
    others = set(batch.input_ids[:4][batch.attention_mask[:4].bool()].tolist())
    only_in_reports = sorted(report_tokens - others)
    assert only_in_reports and bool((emb.grad[only_in_reports].abs().sum(1) > 0).all())


def test_methods_that_need_images_refuse_report_sources(tiny_dataset, tmp_path):
    from medvlp.train.loop import pretrain

    cfg = _cfg(tiny_dataset, tmp_path, REPORTS, recipe="configs/methods/clip.yaml")
    with pytest.raises(ConfigError, match="kind 'report'.*cannot train method 'clip'"):
        pretrain(cfg)


def test_report_source_images_are_never_read(tiny_dataset, tmp_path):
    """A report corpus without image files: the source is read and batched without touching images."""
    from medvlp.data.mixed import Source

    cfg = _cfg(tiny_dataset, tmp_path, REPORTS)
    sources = read_sources(cfg)
    reports = [replace(s, image=str(tmp_path / "no-such-image.png")) for s in sources[2].samples]
    sources[2] = Source("train", "report", 1.0, reports)
    tok = train_wordpiece([s.text() for s in reports], 300)
    stream = MixedStream(sources, Preprocess.from_config(cfg), tok, read_info(tiny_dataset)["classes"], batch_size=8,
                         max_length=48, sections=cfg.data.sections, seed=0, augment=False)
    batch = next(iter(stream))
    assert not batch.skipped and batch.has_image.tolist() == [True] * 6 + [False] * 2


def test_every_parameter_gets_a_gradient(tiny_dataset, tmp_path):
    method, batch = _mixed(tiny_dataset, tmp_path)
    out = method(batch)
    assert set(out) == {"loss", "loss_medclip", "logit_scale", "n_image_label", "n_report_only"}
    out["loss"].backward()
    missing = [n for n, p in method.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_overfits_one_batch(tiny_dataset, tmp_path):
    method, batch = _mixed(tiny_dataset, tmp_path)
    opt = torch.optim.AdamW(method.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = method(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize("override, key", [
    ("method.tau_t=0", "method.tau_t"),
    ("method.local_loss=true", "method.local_loss"),
    ("method.init_temperature=2", "method.init_temperature"),
])
def test_bad_config_names_the_key(tiny_dataset, tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        _cfg(tiny_dataset, tmp_path, override)


def test_pretrain_then_evaluate(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", RECIPE, *TINY, f"data.manifest={tiny_dataset}", f"train.output_dir={run}",
                 MIX, "train.steps=3"]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--out", str(out), "--tasks", "zeroshot,retrieval,linear_probe,localization"]) == 0
    m = json.loads((out / "metrics.json").read_text())["run"]
    assert not m["meta"].get("skipped_tasks") and {"zeroshot", "retrieval", "linear_probe", "localization"} <= set(m)
