"""Uni-Mlip recipe: SimCSE masking, feature noise, token dropout, report augmentation, the feature-level
image term, gradients per term, overfitting, branch switches, VQA features, end to end."""
from __future__ import annotations

import json
import math
from itertools import permutations
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from medvlp.cli import main
from medvlp.config import load_config
from medvlp.errors import ConfigError
from medvlp.hub import build_method
from medvlp.losses.selfsup import nt_xent
from medvlp.methods.unimlip import augment_report, token_dropout_pool
from medvlp.models.augment import feature_noise
from tests.conftest import TINY
from tests.test_m3ae import _one_batch, check_fused_vqa_features

RECIPE = "configs/methods/unimlip.yaml"


def _method_and_batch(dataset, tmp_path, *extra):
    cfg = load_config(RECIPE, [*TINY, f"data.manifest={dataset}", f"train.output_dir={tmp_path / 'run'}",
                               "data.train_split=train", *extra])
    tok, batch = _one_batch(cfg)
    torch.manual_seed(0)
    return build_method(cfg, tok), batch


def test_nt_xent_pair_keys_remove_identical_negatives():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    z2 = z1.clone()
    # samples 1 and 2 share a key: their cross logits go, sample 0 keeps all its negatives
    keyed = nt_xent(z1, z2, tau=0.5, pair_keys=torch.tensor([7, 3, 3]))
    # rows of samples 1 / 2: positive cos 1, negatives only sample 0's two views (cos 0)
    row12 = -(2.0 - math.log(math.exp(2.0) + 2))
    # rows of sample 0: positive cos 1, four negatives with cos 0
    row0 = -(2.0 - math.log(math.exp(2.0) + 4))
    assert keyed.item() == pytest.approx((2 * row0 + 4 * row12) / 6, rel=1e-6)
    assert keyed.item() < nt_xent(z1, z2, tau=0.5).item()


def test_feature_noise_is_relative_and_differentiable():
    x = torch.randn(256, 64) * 10
    x.requires_grad_(True)
    y = feature_noise(x, 0.1, generator=torch.Generator().manual_seed(0))
    rel = ((y - x).std() / x.std()).item()
    assert rel == pytest.approx(0.1, rel=0.1)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_token_dropout_pool_known_answers():
    tokens = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [9.0, 9.0]],
                           [[0.0, 2.0], [2.0, 0.0], [7.0, 7.0], [4.0, 4.0]]], requires_grad=True)
    padding = torch.tensor([[False, False, False, True], [False, False, True, True]])
    # nothing dropped: the mean over the non-padding tokens
    torch.testing.assert_close(token_dropout_pool(tokens, padding, 0.0), torch.tensor([[3.0, 2.0], [1.0, 1.0]]))
    # (almost) everything dropped: only [CLS] is left, and only it gets a gradient
    only_cls = token_dropout_pool(tokens, padding, 1.0 - 1e-12)
    torch.testing.assert_close(only_cls, tokens[:, 0])
    only_cls.sum().backward()
    assert tokens.grad[:, 1:].abs().sum() == 0 and torch.equal(tokens.grad[:, 0], torch.ones(2, 2))
    # on average about half of the tokens are kept at 0.5: the pool is a mean of [CLS] and a random subset
    big = torch.arange(1001.0).view(1, 1001, 1)
    kept = token_dropout_pool(big, None, 0.5, generator=torch.Generator().manual_seed(0))
    assert 400 < kept.item() < 600


# [CLS]=2 [SEP]=3 [PAD]=0; words: "a b ." "c d ." "e" with "." = 9
IDS = torch.tensor([[2, 11, 12, 9, 13, 14, 9, 15, 3, 0, 0]])
WORDS = torch.tensor([[-1, 0, 1, 2, 3, 4, 5, 6, -1, -1, -1]])
MASK = (IDS != 0).long()


def test_augment_report_without_options_is_the_identity():
    ids, mask, words = augment_report(IDS, MASK, WORDS, pad_id=0)
    assert torch.equal(ids, IDS) and torch.equal(mask, MASK) and torch.equal(words, WORDS)


def test_augment_report_word_dropout_keeps_protected_words_and_packs_left():
    protected = torch.isin(IDS, torch.tensor([12, 9]))  # e.g. "no" and "."
    ids, mask, words = augment_report(IDS, MASK, WORDS, pad_id=0, word_drop=1.0 - 1e-12, protected=protected)
    assert ids.tolist() == [[2, 12, 9, 9, 3, 0, 0, 0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]]
    assert words.tolist() == [[-1, 1, 2, 5, -1, -1, -1, -1, -1, -1, -1]]
    # a row that would lose every word keeps them all
    same, _, _ = augment_report(IDS, MASK, WORDS, pad_id=0, word_drop=1.0 - 1e-12)
    assert torch.equal(same, IDS)
    # a multi-token word goes as a whole: word 0 spans two tokens here
    ids2, _, _ = augment_report(IDS, MASK, torch.tensor([[-1, 0, 0, 1, 2, 3, 4, 5, -1, -1, -1]]), pad_id=0,
                                word_drop=1.0 - 1e-12, protected=torch.isin(IDS, torch.tensor([11])))
    assert ids2.tolist()[0][:4] == [2, 11, 12, 3]


def test_augment_report_shuffles_whole_sentences():
    sentences = [[11, 12, 9], [13, 14, 9], [15]]  # the last one has no "." (a truncated report)
    orders = {tuple(t for i in perm for t in sentences[i]) for perm in permutations(range(3))}
    seen = set()
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        ids, mask, _ = augment_report(IDS, MASK, WORDS, pad_id=0, boundaries=IDS == 9, generator=gen)
        row = ids[0].tolist()
        # [CLS] first, [SEP] after the last word, padding after it; each sentence whole and in order
        assert row[0] == 2 and row[8] == 3 and row[9:] == [0, 0] and torch.equal(mask, MASK)
        assert tuple(row[1:8]) in orders
        seen.add(tuple(row[1:8]))
    assert seen == orders  # every order appears


def _is_subsequence(part: list, whole: list) -> bool:
    it = iter(whole)
    return all(tok in it for tok in part)


def test_report_augmentation_in_the_method_is_medical_safe(tiny_dataset, tmp_path):
    from medvlp.data.tokenize import encode_texts, train_wordpiece

    texts = ["no pleural effusion. heart size is 2.5 cm. possible consolidation.", "lungs are clear. no pneumothorax."]
    tok = train_wordpiece(texts, 300)  # digits in the vocabulary (the tiny reports have none)
    cfg = load_config(RECIPE, [*TINY, f"data.manifest={tiny_dataset}", "method.txt_aug_word_drop=0.5"])
    method = build_method(cfg, tok)
    batch = SimpleNamespace(**encode_texts(tok, texts, 48))

    def sentences(ids: list[int]) -> list[list[str]]:  # split at "." except between digits
        toks, out, cur = tok.convert_ids_to_tokens(ids), [], []
        for i, t in enumerate(toks):
            cur.append(t)
            if t == "." and not (0 < i < len(toks) - 1 and toks[i - 1].isdigit() and toks[i + 1].isdigit()):
                out.append(cur)
                cur = []
        return out + ([cur] if cur else [])

    originals = [sentences(batch.input_ids[r][batch.word_ids[r] >= 0].tolist()) for r in range(2)]
    original_tokens = [[t for sent in o for t in sent] for o in originals]
    dropped = 0
    for seed in range(20):
        torch.manual_seed(seed)
        ids, mask = method.augment_text(batch)
        for r in range(2):
            kept = ids[r][mask[r].bool()].tolist()
            assert kept[0] == tok.cls_token_id and kept[-1] == tok.sep_token_id
            got = sentences(kept[1:-1])
            # as many sentences; each is part of one original sentence, so a negation never changes scope
            assert len(got) == len(originals[r])
            assert all(any(_is_subsequence(g, o) for o in originals[r]) for g in got)
            flat = [t for sent in got for t in sent]
            for word in ("no", "possible", "2", "5"):  # cues and numbers are never dropped
                assert flat.count(word) == original_tokens[r].count(word)
            assert r == 1 or "2 . 5" in " ".join(flat)  # the decimal stays whole
            dropped += len(flat) < len(original_tokens[r])
    assert dropped > 10  # and other words are dropped


def test_feature_level_image_term_known_answer(tiny_dataset, tmp_path):
    # with no perturbation the term is NT-Xent between identical views: by hand, each of the 2B rows
    # has logit 1/tau for its positive and 2 x cos(z_i, z_k)/tau for every other sample k
    method, batch = _method_and_batch(tiny_dataset, tmp_path)
    method.cfg.feat_noise_std = 0.0
    seen = {}
    method.vision.register_forward_hook(lambda m, a, o: seen.__setitem__("pooled", o.pooled))
    parts, _ = method.loss_terms(batch)
    b, tau = len(batch), method.cfg.ssl_temperature
    z = F.normalize(method.ssl_head(seen["pooled"][:b]).double(), dim=-1)
    cos = z @ z.t()
    off = cos.masked_fill(torch.eye(b, dtype=torch.bool), float("-inf")) / tau
    by_hand = (-1 / tau + torch.logsumexp(torch.cat([torch.full((b, 1), 1 / tau, dtype=torch.double),
                                                     off, off], dim=1), dim=1)).mean()
    assert parts["ssl_feat"][1].item() == pytest.approx(by_hand.item(), rel=1e-5)


# which tower each term must train (the fusion terms train both through the fused tokens)
TERM_TOWERS = {"clip": ("vision", "text"), "feat": ("vision", "text"), "ssl": ("vision",), "ssl_feat": ("vision",),
               "txt_ssl": ("text",), "itm": ("vision", "text"), "mlm": ("vision", "text")}


@pytest.mark.parametrize("perturbation", ["noise", "token_dropout"])
def test_every_parameter_gets_a_gradient_and_each_term_contributes(tiny_dataset, tmp_path, perturbation):
    method, batch = _method_and_batch(tiny_dataset, tmp_path, f"method.feat_perturbation={perturbation}")
    assert method.text_dropout_passes  # the default tower has dropout: SimCSE runs two real passes
    terms = {"clip": 1.0, "feat": 1.0, "ssl": 1.0, "ssl_feat": 0.5, "txt_ssl": 0.5, "itm": 1.0, "mlm": 1.0}
    parts, _ = method.loss_terms(batch)
    assert {k: w for k, (w, _) in parts.items()} == terms
    towers = {name: [p for p in getattr(method, name).parameters()] for name in ("vision", "text")}
    for name, (weight, term) in parts.items():  # each term alone moves the towers it should train
        for tower in TERM_TOWERS[name]:
            grads = torch.autograd.grad(weight * term, towers[tower], retain_graph=True, allow_unused=True)
            assert any(g is not None and g.abs().sum() > 0 for g in grads), (name, tower)
    torch.manual_seed(0)
    out = method(batch)
    assert {f"loss_{k}" for k in terms} <= set(out)
    assert out["loss"].item() == pytest.approx(sum(w * out[f"loss_{k}"].item() for k, w in terms.items()), rel=1e-5)
    out["loss"].backward()
    assert [n for n, p in method.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_overfits_one_batch(tiny_dataset, tmp_path):
    # a dropout-free tower: SimCSE takes its two views from dropout on the pooled features
    method, batch = _method_and_batch(tiny_dataset, tmp_path, "model.text.dropout=0.0")
    assert not method.text_dropout_passes
    opt = torch.optim.AdamW(method.parameters(), lr=2e-3)
    losses = []
    for _ in range(50):
        torch.manual_seed(1)  # the same views, noise, masks and negatives every step
        out = method(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert out["loss_txt_ssl"].item() > 0
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize("key, term, module", [
    ("feat_weight", "feat", None), ("ssl_weight", "ssl", None), ("ssl_feat_weight", "ssl_feat", None),
    ("txt_ssl_weight", "txt_ssl", None), ("itm_weight", "itm", "itm_head"), ("mlm_weight", "mlm", "mlm_head"),
])
def test_a_zero_weight_turns_its_branch_off(tiny_dataset, tmp_path, key, term, module):
    method, batch = _method_and_batch(tiny_dataset, tmp_path, f"method.{key}=0")
    rows = {}
    method.vision.register_forward_hook(lambda m, a, o: rows.__setitem__("vision", a[0].shape[0]))
    method.text.register_forward_hook(lambda m, a, o: rows.__setitem__("text", a[0].shape[0]))
    out = method(batch)
    assert f"loss_{term}" not in out and "loss_clip" in out
    if module is not None:
        assert getattr(method, module) is None
    b = len(batch)
    assert rows["vision"] == (b if key == "ssl_weight" else 2 * b)  # the second view only for NT-Xent
    assert rows["text"] == {"txt_ssl_weight": 2 * b, "mlm_weight": 2 * b}.get(key, 3 * b)
    out["loss"].backward()  # what is left still trains


def test_without_image_self_supervision_there_is_no_ssl_head(tiny_dataset, tmp_path):
    method, batch = _method_and_batch(tiny_dataset, tmp_path, "method.ssl_weight=0", "method.ssl_feat_weight=0")
    assert method.ssl_head is None and not {"loss_ssl", "loss_ssl_feat"} & set(method(batch))
    # the feature-level term alone keeps the head but needs only one view
    method, batch = _method_and_batch(tiny_dataset, tmp_path, "method.ssl_weight=0")
    rows = {}
    method.vision.register_forward_hook(lambda m, a, o: rows.__setitem__("vision", a[0].shape[0]))
    out = method(batch)
    assert method.ssl_head is not None and "loss_ssl_feat" in out and rows["vision"] == len(batch)


def test_the_itc_sees_the_augmented_report_and_the_fusion_the_clean_one(tiny_dataset, tmp_path):
    seen = {}
    for aug in (True, False):
        extra = () if aug else ("method.txt_aug_word_drop=0", "method.txt_aug_shuffle_sentences=false")
        method, batch = _method_and_batch(tiny_dataset, tmp_path, *extra)
        method.text.register_forward_hook(lambda m, a, o, key=aug: seen.__setitem__(key, (a[0], a[1])))
        method(batch)
        ids, att = seen[aug]
        b = len(batch)
        assert torch.equal(ids[:b], ids[b:2 * b])  # SimCSE's twin: the same (augmented) report
        assert torch.equal(att[2 * b:], batch.attention_mask)  # MLM masks the clean report
        assert torch.equal(ids[:b], batch.input_ids) != aug
    assert not torch.equal(seen[True][1][:b].sum(1), batch.attention_mask.sum(1))  # words were dropped


def test_vqa_features_are_the_fused_cls_pair_and_depend_on_both_inputs(tiny_dataset, tmp_path):
    method, batch = _method_and_batch(tiny_dataset, tmp_path)
    assert callable(method.vqa_features)  # what medvlp.eval.vqa looks for to take the fused path
    feats = check_fused_vqa_features(method, batch)
    with torch.no_grad():
        # deterministic in eval mode (no augmentation on this path), and not a dual-feature fallback
        torch.testing.assert_close(method.vqa_features(batch.images, batch.input_ids, batch.attention_mask), feats)
    no_fusion, _ = _method_and_batch(tiny_dataset, tmp_path, "method.itm_weight=0", "method.mlm_weight=0")
    assert no_fusion.vqa_features is None  # the VQA task then falls back to dual features


def test_without_itm_and_mlm_there_is_no_fusion(tiny_dataset, tmp_path):
    method, batch = _method_and_batch(tiny_dataset, tmp_path, "method.itm_weight=0", "method.mlm_weight=0")
    assert method.fusion is None and not any(n.startswith("fusion") for n, _ in method.named_parameters())
    assert not {"loss_itm", "loss_mlm"} & set(method(batch))


@pytest.mark.parametrize("override, key", [
    ("method.feat_noise_std=0", "method.feat_noise_std"), ("method.mlm_weight=-1", "method.mlm_weight"),
    ("method.txt_ssl_temperature=0", "method.txt_ssl_temperature"), ("method.txt_feat_dropout=1.0", "method.txt_feat_dropout"),
    ("method.text_mask_prob=0.9", "method.text_mask_prob"), ("method.ssl_temperature=0", "method.ssl_temperature"),
    ("method.txt_aug_word_drop=0.6", "method.txt_aug_word_drop"), ("method.feat_token_drop=0", "method.feat_token_drop"),
    ("method.feat_token_drop=1.0", "method.feat_token_drop"), ("method.ssl_feat_weight=-1", "method.ssl_feat_weight"),
    ("method.feat_perturbation=dropout", "method.feat_perturbation"),
])
def test_bad_config_names_the_key(tiny_dataset, tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        _method_and_batch(tiny_dataset, tmp_path, override)


def test_pretrain_then_evaluate(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", RECIPE, *TINY, f"data.manifest={tiny_dataset}", f"train.output_dir={run}",
                 "data.train_split=pretrain", "train.steps=2"]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all({"loss_feat", "loss_ssl", "loss_ssl_feat", "loss_txt_ssl", "loss_itm", "loss_mlm"} <= set(r) for r in rows if "loss" in r)
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())["run"]
    assert {"zeroshot", "retrieval", "linear_probe"} <= set(m)


def test_protected_words_cover_every_casing_of_a_cased_tokenizer():
    """With a cased tokenizer a sentence-initial "No" has other ids than "no": both are protected
    from word dropout; a lowercasing tokenizer yields each word's ids once."""
    from medvlp.data.tokenize import train_wordpiece
    from medvlp.methods.unimlip import PROTECTED_WORDS, protected_spellings

    texts = ["No pneumothorax. There is no effusion.", "NO acute findings. Possible nodule, possibly benign."] * 5
    cased = train_wordpiece(texts, 200, lowercase=False)
    phrases = protected_spellings(cased)
    for word in ("No", "no", "NO", "Possible", "possibly"):
        assert cased(word, add_special_tokens=False)["input_ids"] in phrases, word
    lower = train_wordpiece(texts, 200)
    assert len(protected_spellings(lower)) == len({tuple(lower(w, add_special_tokens=False)["input_ids"])
                                                   for w in PROTECTED_WORDS})


def test_text_tower_dropout_reads_the_model_config():
    """SimCSE's two real passes need dropout in the tower: it is read from the Hugging Face config
    (BERT's hidden / attention dropout, DistilBERT's dropout), 0 when the config names none."""
    from types import SimpleNamespace

    from medvlp.methods.unimlip import text_tower_dropout

    def tower(**conf):
        return SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(**conf)))

    assert text_tower_dropout(tower(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0)) == 0.1
    assert text_tower_dropout(tower(dropout=0.0, attention_dropout=0.0)) == 0.0
    assert text_tower_dropout(tower(hidden_size=384)) == 0.0 and text_tower_dropout(object()) == 0.0
