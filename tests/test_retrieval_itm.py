"""Retrieval by the ITM head (``retrieval_itm``): chance levels and re-ranking by hand, the fixed
pool, an oracle and a constant matcher on fake models, the fusion models' ``itm_logits`` hook,
and ``medvlp evaluate --tasks retrieval_itm`` end to end on a tiny M3AE / CLIP / MAE."""
from __future__ import annotations

import json
from math import comb
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medvlp.cli import main
from medvlp.errors import ConfigError
from medvlp.eval.metrics import recall_at_k
from medvlp.eval.retrieval_itm import (
    RetrievalItmSkipped,
    chance_recall_at_k,
    evaluate_retrieval_itm,
    pool_indices,
    rerank_scores,
)
from tests.conftest import TINY
from tests.test_m3ae import SMALL, _method_and_batch


def test_chance_recall_by_hand_and_against_random_rankings():
    relevant = np.array([[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]], dtype=bool)
    got = chance_recall_at_k(relevant, ks=(1, 2, 10))
    # query 0 and 2: 1 relevant of 4; query 1: 2 of 4
    r1 = np.mean([1 / 4, 1 - comb(2, 1) / comb(4, 1), 1 / 4])
    r2 = np.mean([1 - comb(3, 2) / comb(4, 2), 1 - comb(2, 2) / comb(4, 2), 1 - comb(3, 2) / comb(4, 2)])
    assert got["R@1"] == pytest.approx(r1) and got["R@2"] == pytest.approx(r2) and got["R@10"] == 1.0
    rng = np.random.default_rng(0)
    sampled = np.mean([recall_at_k(rng.random(relevant.shape), relevant, (1, 2))["R@2"] for _ in range(4000)])
    assert sampled == pytest.approx(r2, abs=0.02)


def test_rerank_orders_the_candidates_by_itm_above_everything_else():
    sim = np.array([[0.9, 0.8, 0.7, 0.1, 0.75]])
    candidates = np.array([[0, 1]])  # the ITC top 2
    out = rerank_scores(sim, candidates, np.array([[-3.0, 2.0]]))
    assert list(np.argsort(-out[0], kind="stable")) == [1, 0, 4, 2, 3]  # ITM order, then ITC order
    # ITM scores far below the similarities still stay on top
    out = rerank_scores(sim, candidates, np.array([[-100.0, -200.0]]))
    assert list(np.argsort(-out[0], kind="stable")) == [0, 1, 4, 2, 3]
    # equal ITM scores keep the ITC order, whatever the candidates' column order
    out = rerank_scores(sim, np.array([[4, 2, 1]]), np.array([[0.5, 0.5, 0.5]]))
    assert list(np.argsort(-out[0], kind="stable")) == [1, 4, 2, 0, 3]  # by index it would be 1, 2, 4


def test_pool_is_fixed_by_the_ids_not_their_order():
    ids = [f"s{i}" for i in range(50)]
    rows = pool_indices(ids, 10)
    assert len(rows) == 10 and list(rows) == sorted(rows)
    shuffled = list(reversed(ids))
    assert sorted(shuffled[j] for j in pool_indices(shuffled, 10)) == sorted(ids[j] for j in rows)
    assert len(pool_indices(ids, 500)) == 50


class _FakeFusion(nn.Module):
    """Image i and report i carry the code i; the ITM logit is the codes' agreement (an oracle),
    or 0 for every pair (``constant``). With ``shared``, ITC embeddings are the codes plus noise
    that often puts the true pair outside the top 1 but inside the top 16."""

    def __init__(self, n: int, constant: bool = False, shared: bool = False, asym: float = 0.5):
        super().__init__()
        self.n, self.constant, self.supports_text = n, constant, shared
        self.itm_head = nn.Linear(2, 2)
        self.calls = 0
        g = torch.Generator().manual_seed(0)
        self.noise_i, self.noise_t = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        self.asym = torch.rand(n, n, generator=g) * asym  # above 10 it can outweigh the match

    def _code(self, codes):
        return F.one_hot(codes, self.n).float()

    def fusion_image_inputs(self, images):
        return self._code(images[:, 0, 0, 0].long())[:, None, :]

    def fusion_text_inputs(self, input_ids, attention_mask):
        seq = self._code(input_ids[:, 0])[:, None, :].expand(-1, input_ids.shape[1], -1).clone()
        padding = attention_mask == 0
        seq[padding] = float("nan")  # what a padded position holds is never to be used
        return seq, padding

    def itm_logits(self, image_seq, text_seq, text_padding):
        self.calls += image_seq.shape[0]
        if text_padding is not None:  # padded positions must never be read as a report's tokens
            assert torch.isfinite(text_seq[~text_padding]).all()
        agree = (image_seq[:, 0] * text_seq[:, 0]).sum(-1)
        if self.constant:
            return torch.zeros_like(agree)
        # + a fixed score that differs between (image a, report b) and (image b, report a)
        return 10 * agree + self.asym[image_seq[:, 0].argmax(-1), text_seq[:, 0].argmax(-1)]

    def score(self, i: int, t: int) -> float:
        """The matcher's score of image code i with report code t (the brute-force reference)."""
        return (0.0 if self.constant else 10.0 * (i == t) + float(self.asym[i, t]))

    def encode_image(self, images):
        codes = images[:, 0, 0, 0].long()
        return F.normalize(self._code(codes) + 0.6 * self.noise_i[codes], dim=-1)

    def encode_text(self, input_ids, attention_mask):
        codes = input_ids[:, 0]
        return F.normalize(self._code(codes) + 0.6 * self.noise_t[codes], dim=-1)


def _batches(n: int, batch: int = 16):
    out = []
    for start in range(0, n, batch):
        idx = torch.arange(start, min(n, start + batch))
        images = idx.float()[:, None, None, None].expand(-1, 1, 4, 4).clone()
        length = 3 + start // batch  # every batch padded to its own longest report, as the collator does
        ids = torch.cat([idx[:, None], torch.full((len(idx), length - 1), 7)], 1)
        mask = torch.ones(len(idx), length, dtype=torch.long)
        mask[:, length - 1] = 0
        mask[0, 2:] = 0  # one shorter report inside the batch
        texts = [f"report {i}" for i in idx.tolist()]
        out.append(SimpleNamespace(images=images, input_ids=ids, attention_mask=mask, texts=texts,
                                   ids=[f"s{i}" for i in idx.tolist()]))
    return out


def _embeddings(model, batches):
    """The test split's ITC embeddings as the runner passes them (``SplitEmbeddings`` fields)."""
    return SimpleNamespace(ids=[i for b in batches for i in b.ids], texts=[t for b in batches for t in b.texts],
                           image_emb=torch.cat([model.encode_image(b.images) for b in batches]),
                           text_emb=torch.cat([model.encode_text(b.input_ids, b.attention_mask) for b in batches]))


def test_oracle_matcher_retrieves_everything_and_a_constant_one_is_at_chance():
    n = 40
    oracle = evaluate_retrieval_itm(_FakeFusion(n), _batches(n), rerank_k=16, pool_size=32)
    const = evaluate_retrieval_itm(_FakeFusion(n, constant=True), _batches(n), rerank_k=16, pool_size=32)
    pool, cpool = oracle["pool"], const["pool"]
    assert pool["n"] == 32 and pool["chance"]["R@1"] == pytest.approx(1 / 32)
    assert pool["itm"]["image_to_text"]["R@1"] == 1.0 and pool["itm"]["text_to_image"]["R@1"] == 1.0
    # a constant score ranks by index: only the first pooled query finds its pair at rank 1
    assert cpool["itm"]["image_to_text"]["R@1"] == pytest.approx(1 / 32)
    assert cpool["itm"]["image_to_text"]["R@10"] == pytest.approx(10 / 32)
    assert "rerank" not in oracle and "rerank" in oracle["skipped_parts"] and "itc" not in pool


def test_reranking_lifts_itc_to_the_itm_order_within_the_top_k():
    n = 40
    model = _FakeFusion(n, shared=True, asym=20.0)  # the re-ranked order is not just "true pair first"
    res = evaluate_retrieval_itm(model, _batches(n), rerank_k=16, pool_size=20, ks=(1, 2, 3, 5, 10),
                                 embeddings=_embeddings(model, _batches(n)))
    rr = res["rerank"]
    assert rr["n"] == n and rr["k"] == 16
    itc_r1 = rr["itc"]["image_to_text"]["R@1"]
    assert itc_r1 < 0.9, "the noisy ITC should miss some pairs at rank 1 (else the test shows nothing)"
    # every true pair the ITC put in its top 16 goes to rank 1
    img = torch.cat([model.encode_image(b.images) for b in _batches(n)]).double()
    txt = torch.cat([model.encode_text(b.input_ids, b.attention_mask) for b in _batches(n)]).double()
    rank = (np.argsort(-(img @ txt.T).numpy(), axis=1, kind="stable") == np.arange(n)[:, None]).argmax(1)
    assert rr["image_to_text"]["R@1"] < 1.0  # the asymmetric part outranks some true pairs
    # brute force, both directions: each query's ITC top 16 sorted by the matcher's own score
    sim = (img @ txt.T).numpy()
    for direction, scores, key in (("image_to_text", sim, lambda q, c: model.score(q, c)),
                                   ("text_to_image", sim.T, lambda q, c: model.score(c, q))):
        order = np.argsort(-scores, axis=1, kind="stable")
        rank = [list(sorted(row[:16], key=lambda c, q=q: (-key(q, c), -scores[q, c]))) + list(row[16:])
                for q, row in enumerate(order)]
        rank = np.array([r.index(q) for q, r in enumerate(rank)])
        for k in (1, 5, 10):
            assert rr[direction][f"R@{k}"] == pytest.approx(np.mean(rank < k)), (direction, k)
    assert np.mean(rank < 16) > itc_r1  # the test would show nothing if ITC already had every pair first
    # the pool, both directions, against the same brute force over all its pairs
    rows = pool_indices([f"s{i}" for i in range(n)], 20)
    reference = {}
    for direction, key in (("image_to_text", lambda q, c: model.score(q, c)),
                           ("text_to_image", lambda q, c: model.score(c, q))):
        rank = np.array([sorted(rows, key=lambda c, q=q: (-key(q, c), c)).index(q) for q in rows])
        reference[direction] = [np.mean(rank < k) for k in (1, 2, 3, 5, 10)]
        for k in (1, 2, 3, 5, 10):
            assert res["pool"]["itm"][direction][f"R@{k}"] == pytest.approx(np.mean(rank < k)), (direction, k)
    # the two directions differ here, so a transposed score matrix would be caught
    assert reference["image_to_text"] != reference["text_to_image"]
    assert model.calls == 2 * n * 16 + 20 * 20  # re-ranking both ways, then the pool
    assert "itc" in res["pool"] and "skipped_parts" not in res


def test_a_model_without_matching_head_or_shared_space_is_skipped():
    model = _FakeFusion(8)
    model.itm_head = None
    with pytest.raises(RetrievalItmSkipped, match="neither"):
        evaluate_retrieval_itm(model, _batches(8), rerank_k=16, pool_size=8)


@pytest.mark.parametrize("override, key", [("eval.itm_rerank_k=5", "eval.itm_rerank_k"),
                                           ("eval.itm_pool_size=3", "eval.itm_pool_size")])
def test_bad_itm_settings_name_the_key(tiny_cfg, override, key):
    with pytest.raises(ConfigError, match=key):
        tiny_cfg(override)


def test_itm_logits_are_the_head_on_the_fused_pair(tiny_dataset, tmp_path):
    method, batch, _ = _method_and_batch(tiny_dataset, tmp_path)
    method.eval()
    with torch.no_grad():
        image_seq = method.fusion_image_inputs(batch.images)
        text_seq, padding = method.fusion_text_inputs(batch.input_ids, batch.attention_mask)
        got = method.itm_logits(image_seq, text_seq, padding)
        logits = method.itm_head(method.vqa_features(batch.images, batch.input_ids, batch.attention_mask))
        assert torch.allclose(got, logits[:, 1] - logits[:, 0], atol=1e-5)
        # trimming the padding columns (as score_pairs does) leaves the scores unchanged
        length = int((~padding).sum(1).max()) if padding is not None else text_seq.shape[1]
        trimmed = method.itm_logits(image_seq, text_seq[:, :length],
                                    None if padding is None else padding[:, :length])
        assert torch.allclose(got, trimmed, atol=1e-5)


def test_evaluate_cli_runs_retrieval_itm_on_m3ae_and_clip_and_skips_mae(tiny_dataset, tmp_path):
    runs = {}
    for recipe, extra in (("m3ae", SMALL), ("clip", []), ("mae", [])):
        runs[recipe] = tmp_path / recipe
        assert main(["pretrain", "--config", f"configs/methods/{recipe}.yaml", *TINY, f"data.manifest={tiny_dataset}",
                     f"train.output_dir={runs[recipe]}", "data.train_split=pretrain", "train.steps=2", *extra]) == 0
    for recipe, run in runs.items():
        out = tmp_path / f"eval-{recipe}"
        assert main(["evaluate", str(run), "--out", str(out), "--tasks", "retrieval_itm",
                     "--overrides", "eval.itm_pool_size=12"]) == 0
        m = json.loads((out / "metrics.json").read_text())[recipe]
        if recipe == "mae":
            assert "retrieval_itm" in m["meta"]["skipped_tasks"]
            continue
        pool = m["retrieval_itm"]["pool"]
        assert pool["n"] == 12 and 0 < pool["chance"]["R@1"] <= 1
        if recipe == "m3ae":
            assert set(pool) >= {"itm"} and "itc" not in pool and "rerank" not in m["retrieval_itm"]
            assert 0.0 <= pool["itm"]["image_to_text"]["R@10"] <= 1.0
        else:
            assert "itm" not in pool and "itc" in pool and "itm" in m["retrieval_itm"]["skipped_parts"]


def test_comparison_metrics_read_both_protocols():
    from medvlp.bench import extract_metrics

    r = {"image_to_text": {"R@1": 0.1, "R@10": 0.4}, "text_to_image": {"R@1": 0.2, "R@10": 0.5}}
    got = extract_metrics({"retrieval_itm": {"rerank": {**r, "itc": r, "k": 16}, "pool": {"itm": r, "chance": {}}}})
    assert got["itm_rerank_i2t_R@10"] == 0.4 and got["itm_rerank_t2i_R@1"] == 0.2
    assert got["itm_pool_i2t_R@1"] == 0.1 and got["itm_pool_t2i_R@10"] == 0.5
    assert not any(k.startswith("itc_pool") for k in got)  # no ITC part: no column
