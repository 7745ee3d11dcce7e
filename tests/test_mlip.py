"""MLIP: the knowledge-guided loss pieces by hand (multi-positive InfoNCE with teacher positives,
KL consistency, mention detection on a real tokenized report, allowed categories, restricted
Sinkhorn), then the recipe: every parameter learns (teacher excluded), the teacher moves only in
after_optimizer_step, prototypes are seeded from the knowledge base, definitions refresh on
schedule, one batch is memorised, config errors, and pretrain + evaluate end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from medvlp.cli import main
from medvlp.config import load_config
from medvlp.data.knowledge import load_knowledge
from medvlp.data.sample import MISSING, NEGATIVE, POSITIVE, UNCERTAIN
from medvlp.data.tokenize import encode_texts
from medvlp.errors import ConfigError
from medvlp.hub import build_method
from medvlp.losses.contrastive import info_nce
from medvlp.losses.knowledge import (
    PhraseTable,
    allowed_categories,
    find_mentions,
    multi_positive_info_nce,
    restricted_sinkhorn,
    teacher_consistency_kl,
)
from medvlp.methods.mlip import knowledge_phrases
from tests.conftest import TINY
from tests.test_train import _one_batch

RECIPE = "configs/methods/mlip.yaml"
SMALL = ["model.text.dropout=0.0"]
CLASSES = load_knowledge().classes


def _cfg(dataset, tmp_path, *extra):
    return load_config(RECIPE, [*TINY, f"data.manifest={dataset}", f"train.output_dir={tmp_path / 'run'}",
                                "data.train_split=train", *SMALL, *extra])


def _method_and_batch(dataset, tmp_path, *extra):
    cfg = _cfg(dataset, tmp_path, *extra)
    tok, batch = _one_batch(cfg)
    torch.manual_seed(0)
    return build_method(cfg, tok), batch, tok


# ---------------------------------------------------------------------------- global level
def test_multi_positive_info_nce_known_answer():
    eye = torch.eye(2)
    swapped = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # i2t rows: logits [1, 0, 0, 1] (positives w_i = 1, w'_i = 0); t2i rows: [1, 0, 1, 0] (positives 1, 1)
    loss = multi_positive_info_nce(eye, eye, eye, swapped, 1.0)
    log_z = math.log(2 * math.e + 2)
    assert loss.item() == pytest.approx(0.5 * ((log_z - 0.5) + (log_z - 1.0)), abs=1e-6)


def test_multi_positive_info_nce_with_teacher_equal_to_online_is_clip_plus_log2():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    loss = multi_positive_info_nce(img, txt, img, txt, 10.0)
    assert loss.item() == pytest.approx(info_nce(img, txt, 10.0).item() + math.log(2), abs=1e-5)
    # the identical-text mask acts on online and teacher columns alike
    same = torch.zeros(5, 5, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    masked = multi_positive_info_nce(img, txt, img, txt, 10.0, negative_mask=same)
    assert masked.item() == pytest.approx(info_nce(img, txt, 10.0, negative_mask=same).item() + math.log(2), abs=1e-5)


def test_multi_positive_info_nce_teacher_gets_no_gradient():
    torch.manual_seed(0)
    feats = [F.normalize(torch.randn(4, 6), dim=-1).requires_grad_() for _ in range(4)]
    multi_positive_info_nce(*feats, 5.0).backward()
    assert feats[0].grad.abs().sum() > 0 and feats[1].grad.abs().sum() > 0
    assert feats[2].grad is None and feats[3].grad is None


def test_teacher_consistency_kl_known_answer():
    online = torch.zeros(1, 2, requires_grad=True)  # p = [1/2, 1/2]
    teacher = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)  # q = [1/4, 3/4]
    kl = teacher_consistency_kl(online, teacher)
    assert kl.item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6)
    kl.backward()
    assert teacher.grad is None and online.grad.abs().sum() > 0
    # dKL/dz = p - q
    torch.testing.assert_close(online.grad, torch.tensor([[0.25, -0.25]]))
    assert teacher_consistency_kl(teacher.detach(), teacher.detach()).item() == pytest.approx(0.0, abs=1e-7)


# ---------------------------------------------------------------------------- token level
def test_find_mentions_word_boundaries_longest_and_exclusions():
    # words: [10] [11 12] [13] [14] ; phrase (11, 12) = entity 3, (11,) = entity 5, exclusion (13, 14)
    ids = torch.tensor([[1, 10, 11, 12, 13, 14, 2, 0]])
    words = torch.tensor([[-1, 0, 1, 1, 2, 3, -1, -1]])
    table = PhraseTable.build([([11, 12], 3), ([11], 5), ([13, 14], -1), ([14], 7), ([12], 4)])
    # (11,) starts word 1 but does not end it; (12,) ends it but does not start it; (14,) is
    # inside the exclusion "13 14"
    assert find_mentions(ids, words, table).tolist() == [[-1, -1, 3, 3, -1, -1, -1, -1]]
    # padding tokens never match even when their id does
    assert find_mentions(torch.tensor([[1, 0, 0]]), torch.tensor([[-1, -1, -1]]),
                         PhraseTable.build([([0], 1)])).tolist() == [[-1, -1, -1]]


def test_knowledge_mentions_on_a_real_tokenized_report(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tmp_path)
    tok, _ = _one_batch(cfg)
    table = knowledge_phrases(load_knowledge(), CLASSES, tok)
    texts = ["there is a small right pleural effusion", "no pericardial effusion. small effusions.",
             "heart size is normal"]
    enc = encode_texts(tok, texts, 64)
    found = find_mentions(enc["input_ids"], enc["word_ids"], table)
    effusion = CLASSES.index("Pleural Effusion")
    # sentence 1: the tokens of words 5 and 6 ("pleural effusion") and nothing else
    expected = torch.where((enc["word_ids"][0] == 5) | (enc["word_ids"][0] == 6), effusion, -1)
    assert torch.equal(found[0], expected) and (found[0] == effusion).sum() >= 2
    # sentence 2: "pericardial effusion" is an exclusion; the plural "effusions" (word 5) counts
    words2 = enc["word_ids"][1]
    assert torch.equal(found[1] == effusion, words2 == 5)
    assert (found[2] == -1).all()  # "heart size is normal" is a negative phrase, not a synonym


# ---------------------------------------------------------------------------- category level
def test_allowed_categories_known_answer():
    P, N, U, M = POSITIVE, NEGATIVE, UNCERTAIN, MISSING
    labels = torch.tensor([[N, P, N, M], [N, N, N, M], [N, N, U, N], [P, N, N, N]])
    has = torch.tensor([True, True, True, False])
    got = allowed_categories(labels, has, 4, 4, no_finding=0)
    assert got.int().tolist() == [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [1, 1, 1, 1]]
    strict = allowed_categories(labels, has, 4, 4, no_finding=0, uncertain_allowed=False)
    assert strict[2].int().tolist() == [1, 0, 0, 0]
    assert allowed_categories(labels, has, 4, 4, no_finding=None)[1].all()  # nothing allowed, no "No Finding"
    assert allowed_categories(None, None, 2, 3, no_finding=0).all()


def test_restricted_sinkhorn_codes_stay_in_allowed_classes():
    torch.manual_seed(0)
    allowed = torch.tensor([[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 1, 0, 0, 0], [1, 1, 1, 1, 0],
                            [0, 0, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    codes = restricted_sinkhorn(torch.randn(6, 5), allowed, eps=1.0, iters=300)  # converged
    assert torch.isfinite(codes).all()
    assert (codes[~allowed] == 0).all()
    torch.testing.assert_close(codes.sum(1), torch.ones(6))
    # class-frequency shares: each sample spreads one unit over what it allows
    shares = (allowed.float() / allowed.float().sum(1, keepdim=True)).sum(0)
    torch.testing.assert_close(codes.sum(0), shares, atol=1e-3, rtol=0)
    assert codes[:, 4].sum() == 0  # nobody allows class 4: an empty column, no NaN
    assert codes[0].tolist() == [1, 0, 0, 0, 0] and codes[2].tolist() == [0, 1, 0, 0, 0]


# ---------------------------------------------------------------------------- the recipe
def test_every_parameter_gets_a_gradient(tiny_dataset, tmp_path):
    method, batch, _ = _method_and_batch(tiny_dataset, tmp_path)
    out = method(batch)
    assert {"loss", "loss_global", "loss_contrast", "loss_kl", "loss_local", "loss_category",
            "mention_fraction", "logit_scale"} == set(out)
    assert out["mention_fraction"] > 0
    out["loss"].backward()
    teacher = {n for n, _ in method.named_parameters() if n.startswith("teacher.")}
    assert teacher and all(not p.requires_grad and p.grad is None for n, p in method.named_parameters() if n in teacher)
    missing = [n for n, p in method.named_parameters()
               if n not in teacher and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []


def test_knowledge_enriches_only_mentioning_tokens_and_labels_restrict_codes(tiny_dataset, tmp_path, monkeypatch):
    """Inside the recipe: the definition embedding is added to exactly the word tokens that mention
    a knowledge-base entity (scaled by knowledge_weight), and the category codes stay in the
    classes each sample's labels allow."""
    import medvlp.methods.mlip as mlip_module

    method, batch, _ = _method_and_batch(tiny_dataset, tmp_path)
    seen = {}

    def local_spy(words, *args, **kwargs):
        seen["words"] = words.detach().clone()
        return mgca_local_loss(words, *args, **kwargs)

    def sinkhorn_spy(scores, allowed, **kwargs):
        codes = restricted_sinkhorn(scores, allowed, **kwargs)
        seen.setdefault("codes", []).append((codes, allowed))
        return codes

    from medvlp.losses.local import mgca_local_loss
    monkeypatch.setattr(mlip_module, "mgca_local_loss", local_spy)
    monkeypatch.setattr(mlip_module, "restricted_sinkhorn", sinkhorn_spy)
    method.eval()  # no dropout: the two passes differ only by the knowledge term
    words = {}
    for weight in (0.0, 0.5):
        method.cfg.knowledge_weight = weight
        with torch.no_grad():
            method(batch)
        words[weight] = seen["words"]
    mentioned = find_mentions(batch.input_ids, batch.word_ids, method.phrases) >= 0
    assert mentioned.any() and (~mentioned & (batch.word_ids >= 0)).any()
    changed = (words[0.5] - words[0.0]).abs().amax(-1) > 1e-6
    assert torch.equal(changed, mentioned)
    delta_norm = (words[0.5] - words[0.0]).norm(dim=-1)[mentioned]
    torch.testing.assert_close(delta_norm, torch.full_like(delta_norm, 0.5))  # 0.5 x a unit definition

    expected = allowed_categories(batch.labels, batch.has_labels, len(batch.images), len(method.classes),
                                  no_finding=method.no_finding, uncertain_allowed=method.cfg.uncertain_allowed)
    assert not expected.all()  # some sample is restricted
    for codes, allowed in seen["codes"]:
        assert torch.equal(allowed.cpu(), expected)
        assert (codes[~allowed] == 0).all()


def test_teacher_moves_only_after_the_optimizer_step(tiny_dataset, tmp_path):
    method, batch, _ = _method_and_batch(tiny_dataset, tmp_path, "method.ema_schedule=constant",
                                         "method.ema_momentum=0.5")
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    before = method.teacher.module.text_proj.weight.clone()
    method(batch)["loss"].backward()
    opt.step()
    torch.testing.assert_close(method.teacher.module.text_proj.weight, before)  # forward + step: unchanged
    method.after_optimizer_step(0)
    torch.testing.assert_close(method.teacher.module.text_proj.weight, 0.5 * before + 0.5 * method.text_proj.weight)
    method.train()
    assert not method.teacher.module.training


def test_prototypes_are_seeded_from_the_knowledge_base(tiny_dataset, tmp_path):
    method, _, tok = _method_and_batch(tiny_dataset, tmp_path)
    kb = load_knowledge()
    assert method.classes == CLASSES and method.prototypes.shape == (len(CLASSES), 32)
    enc = tok([f"{c}: {kb.definition(c)}" for c in CLASSES], padding=True, truncation=True, max_length=48,
              return_tensors="pt")
    method.eval()
    with torch.no_grad():
        seeds = F.normalize(method.text_proj(method.text(enc["input_ids"], enc["attention_mask"]).pooled), dim=-1)
    torch.testing.assert_close(method.prototypes.detach(), seeds, atol=1e-5, rtol=1e-5)


def test_definition_embeddings_refresh_on_schedule(tiny_dataset, tmp_path):
    method, batch, _ = _method_and_batch(tiny_dataset, tmp_path, "method.definition_refresh_every=2",
                                         "method.ema_schedule=constant", "method.ema_momentum=0.0")
    method(batch)
    first = method.definition_cache.clone()
    assert first.abs().sum() > 0
    with torch.no_grad():
        method.text.model.embeddings.word_embeddings.weight.mul_(2.0)
    method.after_optimizer_step(0)  # the teacher now equals the changed student
    method(batch)
    torch.testing.assert_close(method.definition_cache, first)  # age 1: still cached
    method.after_optimizer_step(1)
    method(batch)
    assert not torch.allclose(method.definition_cache, first)  # refreshed from the new teacher
    assert {"definition_cache", "definition_age"} <= set(method.state_dict())  # exact resume


def test_patch_embeddings_and_encoders(tiny_dataset, tmp_path):
    method, batch, _ = _method_and_batch(tiny_dataset, tmp_path)
    method.eval()
    with torch.no_grad():
        patches = method.patch_embeddings(batch.images)
        img = method.encode_image(batch.images)
    assert patches.shape == (len(batch), 16, 32)
    torch.testing.assert_close(patches.norm(dim=-1), torch.ones(len(batch), 16))
    torch.testing.assert_close(img, F.normalize(method.image_proj(method.vision(batch.images).pooled), dim=-1))


def test_overfits_one_batch(tiny_dataset, tmp_path):
    # the teacher starts as the random student and follows slowly (momentum 0.996), so its
    # positives and the KL term hold the global loss back: more steps than CLIP needs
    method, batch, _ = _method_and_batch(tiny_dataset, tmp_path)
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(120):
        torch.manual_seed(1)  # the same teacher views every step
        loss = method(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_optimizer_step(step)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    method.eval()
    with torch.no_grad():
        sim = method.encode_image(batch.images) @ method.encode_text(batch.input_ids, batch.attention_mask).t()
    assert torch.equal(sim.argmax(1), torch.arange(len(batch)))


@pytest.mark.parametrize("override, key", [
    ("method.teacher_mask_ratio=1.0", "method.teacher_mask_ratio"),
    ("method.teacher_token_drop=-0.1", "method.teacher_token_drop"),
    ("method.kl_weight=-1", "method.kl_weight"),
    ("method.global_weight=0", "method.global_weight"),
    ("method.category_temperature=0", "method.category_temperature"),
    ("method.definition_refresh_every=0", "method.definition_refresh_every"),
    ("method.ema_momentum=1.5", "method.ema_momentum"),
    ("method.classes=[Cardiomegaly, Dragon Pox]", "method.classes"),
])
def test_bad_config_names_the_key(tiny_dataset, tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        _method_and_batch(tiny_dataset, tmp_path, override)


def test_pretrain_then_evaluate(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", RECIPE, *TINY, f"data.manifest={tiny_dataset}", f"train.output_dir={run}",
                 "data.train_split=pretrain", "train.steps=3", *SMALL]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())["run"]
    assert not m["meta"].get("skipped_tasks") and {"zeroshot", "retrieval", "linear_probe"} <= set(m)
