"""UMCL recipe: gradients (context vectors included), overfitting, the unified columns (reports +
label-set prompts), labeled-only samples contributing, reduction to CLIP, the labeler option,
config errors, and pretrain + evaluate end to end with learned-prompt zero-shot.

The multi-positive loss itself reduces to CLIP when all labels differ in
tests/test_soft_contrastive.py::test_reduces_to_clip_when_all_labels_differ; here the whole
recipe does (``prompt_texts: labeled_only`` on paired-only data)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from medvlp.bench import first_batch
from medvlp.cli import main
from medvlp.config import load_config
from medvlp.data.manifest import read_info
from medvlp.data.mixed import read_sources
from medvlp.data.sample import MISSING, NEGATIVE, POSITIVE, UNCERTAIN
from medvlp.data.tokenize import train_wordpiece
from medvlp.errors import ConfigError
from medvlp.hub import build_method
from medvlp.losses.contrastive import ClipLoss
from medvlp.methods.clip import text_hashes
from medvlp.methods.umcl import canonical_codes
from tests.conftest import TINY

RECIPE = "configs/methods/umcl.yaml"
SMALL = ["model.text.dropout=0.0", "method.n_ctx=4"]
MIX = "data.sources=[{split: pretrain, kind: paired, weight: 5}, {split: pretrain-labeled, kind: labeled, weight: 3}]"


def _cfg(dataset, tmp_path, *extra):
    return load_config(RECIPE, [*TINY, f"data.manifest={dataset}", f"train.output_dir={tmp_path / 'run'}",
                                MIX, *SMALL, *extra])


def _method_and_batch(dataset, tmp_path, *extra):
    cfg = _cfg(dataset, tmp_path, *extra)
    sources = read_sources(cfg)
    tok = train_wordpiece([s.text() for src in sources if src.kind == "paired" for s in src.samples], 300)
    batch = first_batch(cfg, tok, read_info(dataset)["classes"])
    torch.manual_seed(0)
    return build_method(cfg, tok), batch, cfg


def test_every_parameter_gets_a_gradient(tiny_dataset, tmp_path):
    method, batch, _ = _method_and_batch(tiny_dataset, tmp_path)
    assert (~batch.has_text & batch.has_labels).sum() == 3 and batch.has_text.sum() == 5
    out = method(batch)
    assert set(out) == {"loss", "loss_contrastive", "loss_negative", "logit_scale", "prompt_texts"}
    out["loss"].backward()
    missing = [n for n, p in method.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []
    assert method.prompt_learner.ctx.shape == (4, 32)


def test_overfits_one_batch(tiny_dataset, tmp_path):
    method, batch, _ = _method_and_batch(tiny_dataset, tmp_path, "method.negative_weight=0")
    opt = torch.optim.AdamW(method.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = method(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_reduces_to_clip_on_paired_data_with_distinct_labels(tiny_dataset, tmp_path):
    method, batch, _ = _method_and_batch(tiny_dataset, tmp_path, "method.prompt_texts=labeled_only",
                                         "method.negative_weight=0", "data.sources=[]", "data.train_split=pretrain")
    keep = []  # a sub-batch whose positive label sets are all different
    seen = set()
    for i, row in enumerate(canonical_codes(batch.labels, 0).tolist()):
        key = tuple(c == POSITIVE for c in row)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    assert len(keep) >= 3
    from dataclasses import fields, replace

    sub = replace(batch, **{f.name: getattr(batch, f.name)[keep] for f in fields(batch)
                            if isinstance(getattr(batch, f.name), torch.Tensor)},
                  texts=[batch.texts[i] for i in keep])
    method.eval()
    with torch.no_grad():
        got = method(sub)
        img = method.encode_image(sub.images)
        txt = method.encode_text(sub.input_ids, sub.attention_mask)
        expected = ClipLoss()(img, txt, method.scale(), pair_keys=text_hashes(sub.texts, img.device))
    assert got["prompt_texts"].item() == 0
    assert got["loss"].item() == pytest.approx(expected.item(), abs=1e-5)


def test_labeled_only_samples_contribute(tiny_dataset, tmp_path):
    method, batch, _ = _method_and_batch(tiny_dataset, tmp_path, "method.negative_weight=0",
                                         "method.prompt_texts=labeled_only")
    labeled = (~batch.has_text & batch.has_labels).nonzero().squeeze(1)
    images = batch.images.clone().requires_grad_(True)
    batch.images = images
    out = method(batch)
    out["loss"].backward()
    assert out["prompt_texts"].item() >= 1
    assert images.grad[labeled].abs().sum() > 0  # their images are rows with a target
    assert method.prompt_learner.ctx.grad.abs().sum() > 0  # their prompts are columns


def test_multi_label_prompt_is_the_mean_of_class_prompts(tiny_dataset, tmp_path, monkeypatch):
    method, batch, _ = _method_and_batch(tiny_dataset, tmp_path, "method.negative_weight=0")
    import medvlp.methods.umcl as umcl_module

    seen = {}

    def spy(img, cols, scale, row_codes, col_codes, pair, **kw):
        seen.update(cols=cols, col_codes=col_codes, pair=pair, row_codes=row_codes)
        return cols.sum() * 0.0

    monkeypatch.setattr(umcl_module, "label_contrastive_loss", spy)
    method.eval()
    with torch.no_grad():
        method(batch)
        pos, _ = method.prompt_embeddings(negatives=False)
    t = int(batch.has_text.sum())
    sets = seen["col_codes"][t:] == POSITIVE
    assert len({tuple(r) for r in sets.tolist()}) == sets.shape[0]  # one column per distinct label set
    expected = torch.nn.functional.normalize(sets.float() @ pos, dim=-1)
    torch.testing.assert_close(seen["cols"][t:], expected)
    # an image-label sample's own text is the prompt of its positive set
    for i in (~batch.has_text).nonzero().squeeze(1).tolist():
        j = seen["pair"][i].item()
        assert j >= t and torch.equal(sets[j - t], seen["row_codes"][i] == POSITIVE)


def test_canonical_codes_no_finding_rule():
    P, N, U, M = POSITIVE, NEGATIVE, UNCERTAIN, MISSING
    codes = torch.tensor([[N, N, N], [N, P, N], [N, U, N], [M, M, M]])
    out = canonical_codes(codes, 0)
    assert out.tolist() == [[P, N, N], [N, P, N], [N, U, N], [M, M, M]]


def test_labeler_labels_paired_samples(tiny_dataset, tmp_path):
    from medvlp.data.mixed import label_reports
    from medvlp.data.sample import Sample

    s = Sample(id="a", subject_id="s", study_id="t", split="x", findings="Large right pleural effusion.",
               labels={"Pleural Effusion": NEGATIVE, "Cardiomegaly": POSITIVE})
    (out,) = label_reports([s], ["findings", "impression"])
    assert out.labels["Pleural Effusion"] == POSITIVE and out.labels["Cardiomegaly"] == MISSING
    assert s.labels["Pleural Effusion"] == NEGATIVE  # the manifest's sample is not edited

    cfg = _cfg(tiny_dataset, tmp_path, "data.paired_labels=labeler")
    from medvlp.data.labeler import ReportLabeler

    labeler, classes = ReportLabeler(), read_info(tiny_dataset)["classes"]
    paired = next(src for src in read_sources(cfg) if src.kind == "paired")
    for sample in paired.samples[:10]:
        assert sample.labels == labeler.label(sample.text(cfg.data.sections))
    tok = train_wordpiece([s.text() for s in paired.samples], 300)
    batch = first_batch(cfg, tok, classes)
    texts = [t for t in batch.texts if t]
    expected = [[labeler.label(t).get(c, MISSING) for c in classes] for t in texts]
    assert batch.labels[batch.has_text].tolist() == expected


@pytest.mark.parametrize("override, key", [
    ("method.n_ctx=0", "method.n_ctx"),
    ("method.targets=fancy", "method.targets"),
    ("method.tau_t=0", "method.tau_t"),
    ("method.negative_weight=-1", "method.negative_weight"),
    ("method.prompt_texts=some", "method.prompt_texts"),
    ("method.negation=''", "method.negation"),
    ("method.init_temperature=2", "method.init_temperature"),
    ("data.paired_labels=guess", "data.paired_labels"),
])
def test_bad_config_names_the_key(tiny_dataset, tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        _cfg(tiny_dataset, tmp_path, override)


def test_pretrain_then_evaluate_with_learned_prompts(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", RECIPE, *TINY, f"data.manifest={tiny_dataset}", f"train.output_dir={run}",
                 MIX, "train.steps=3", *SMALL]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--out", str(out), "--tasks", "zeroshot,linear_probe,prompt_tuning",
                 "--overrides", "eval.prompt_tuning_steps=5"]) == 0
    m = json.loads((out / "metrics.json").read_text())["run"]
    assert {"zeroshot", "zeroshot_learned", "linear_probe", "prompt_tuning"} <= set(m)
    assert 0 <= m["zeroshot_learned"]["mean"] <= 1 and m["zeroshot_learned"]["prompts"] == "learned"
    assert set(m["prompt_tuning"]["fractions"]) == set(m["linear_probe"]["fractions"])


def test_negative_prompt_term_known_answer():
    """Mean BCE over POSITIVE / NEGATIVE codes of scale * v . (pos_k - neg_k); UNCERTAIN and MISSING
    codes are left out."""
    from medvlp.methods.umcl import Umcl

    img = torch.tensor([[1.0, 0.0]])
    pos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    neg = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    codes = torch.tensor([[POSITIVE, NEGATIVE, UNCERTAIN, MISSING]])
    # margins 2 * [1, -1, 1, 1]: the positive class at +2 and the negative at -2 each cost log(1 + e^-2)
    got = Umcl._prompt_pair_loss(img, codes, pos, neg, torch.tensor(2.0))
    assert got.item() == pytest.approx(math.log1p(math.exp(-2.0)), abs=1e-6)
    codes_flipped = torch.tensor([[NEGATIVE, POSITIVE, UNCERTAIN, MISSING]])
    got = Umcl._prompt_pair_loss(img, codes_flipped, pos, neg, torch.tensor(2.0))
    assert got.item() == pytest.approx(math.log1p(math.exp(2.0)), abs=1e-6)
