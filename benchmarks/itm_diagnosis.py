"""Why the ITM heads learned nothing: can the fusion encoder learn image-text matching at all on
the trained unimodal features?

On ``standard-v1`` (1,000 steps x 64) the training ITM loss of M3AE, MPMA and Uni-Mlip sits at the
prior's entropy (0.6365 nats for one positive per two negatives) from the first logged steps to
the last, and ``retrieval_itm`` scores them at chance. This script separates the two suspects
(the joint training vs. the fusion + ITM architecture) on one finished checkpoint:

1. the towers are frozen and their token outputs computed once, for ``--train-pairs`` pre-training
   pairs and ``--test-pairs`` test pairs (whole images, unmasked reports);
2. each variant below is trained for ``--steps`` steps on those fixed features with the methods'
   recipe (ITM cross-entropy over B positives and 2B negatives drawn uniformly among pairs with a
   different report, AdamW) and scored by the held-out AUROC of its ITM log-odds on the test
   positives against one uniform negative per test image:

   * ``checkpoint``: the checkpoint's own projections, fusion encoder and ITM head, not trained;
   * ``checkpoint+steps``: the same, trained further;
   * ``fresh depth D``: new projections, a new D-layer fusion encoder and head;
   * ``ITC cosine`` (shared-space models): the cosine of the checkpoint's ITC embeddings, no training.

    python benchmarks/itm_diagnosis.py --checkpoint benchmark-runs/synthcxr-standard-v1-suite/runs/unimlip-seed0/train \\
        --dataset /work/bench/standard-v1

Results: ``benchmarks/results/itm_diagnosis.json`` and ``.md`` (``--name``); several
``--checkpoint`` values are evaluated in one call.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

REPO = Path(__file__).resolve().parents[1]
PRIOR = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))


class Matcher(nn.Module):
    """Projections + fusion encoder + ITM head over frozen tower tokens."""

    def __init__(self, image_to_fusion, text_to_fusion, fusion, itm_head):
        super().__init__()
        self.image_to_fusion, self.text_to_fusion, self.fusion, self.itm_head = (
            image_to_fusion, text_to_fusion, fusion, itm_head)

    def forward(self, image_tokens, text_tokens, text_padding):
        fi, ft = self.fusion(self.image_to_fusion(image_tokens), self.text_to_fusion(text_tokens), text_padding,
                             first_token_only=True)
        logits = self.itm_head(torch.cat([fi[:, 0], ft[:, 0]], -1)).float()
        return logits


@torch.no_grad()
def tower_features(method, samples, cfg, tokenizer, classes, batch_size=128):
    from medvlp.data.loader import make_loader

    img, txt, pad, texts, itc_i, itc_t = [], [], [], [], [], []
    shared = getattr(method, "supports_text", True)
    for batch in make_loader(samples, cfg, tokenizer, classes, train=False, batch_size=batch_size):
        keep = torch.as_tensor([i for i, t in enumerate(batch.texts) if t.strip()], dtype=torch.long)
        images, ids, mask = batch.images[keep], batch.input_ids[keep], batch.attention_mask[keep]
        vis, tx = method.vision(images), method.text(ids, mask)
        img.append(torch.cat([vis.pooled[:, None], vis.tokens], 1))
        txt.append(tx.tokens)
        pad.append(tx.padding_mask if tx.padding_mask is not None else torch.zeros(tx.tokens.shape[:2], dtype=torch.bool))
        texts += [batch.texts[i] for i in keep.tolist()]
        if shared:
            itc_i.append(method.encode_image(images))
            itc_t.append(method.encode_text(ids, mask))
    length = max(t.shape[1] for t in txt)
    txt = torch.cat([F.pad(t, (0, 0, 0, length - t.shape[1])) for t in txt])
    pad = torch.cat([F.pad(p, (0, length - p.shape[1]), value=True) for p in pad])
    out = {"image": torch.cat(img), "text": txt, "padding": pad, "texts": texts}
    if shared:
        out["itc"] = (torch.cat(itc_i), torch.cat(itc_t))
    return out


def negatives(texts, gen):
    """One report index per image, uniform among the samples whose report differs."""
    norm = [" ".join(t.lower().split()) for t in texts]
    n = len(norm)
    if len(set(norm)) < 2:
        raise SystemExit("itm_diagnosis: every test report has the same text; there is no negative to draw")
    out = []
    for i in range(n):
        while True:
            j = int(torch.randint(n, (1,), generator=gen))
            if norm[j] != norm[i]:
                out.append(j)
                break
    return torch.tensor(out)


def trim(text, padding):
    length = int((~padding).sum(1).max())
    return text[:, :length], padding[:, :length]


@torch.no_grad()
def heldout_auroc(score_fn, feats, neg) -> float:
    n = feats["image"].shape[0]
    scores, labels = [], []
    for start in range(0, n, 256):
        i = torch.arange(start, min(n, start + 256))
        for t_index, label in ((i, 1), (neg[i], 0)):
            scores.append(score_fn(i, t_index))
            labels += [label] * len(i)
    return float(roc_auc_score(labels, torch.cat(scores).numpy()))


def train_matcher(matcher, feats, steps, batch, lr, gen):
    opt = torch.optim.AdamW(matcher.parameters(), lr=lr, weight_decay=0.05)
    n = feats["image"].shape[0]
    batch = min(batch, n)
    norm = [" ".join(t.lower().split()) for t in feats["texts"]]
    codes = torch.tensor([hash(t) for t in norm])
    losses = []
    matcher.train()
    for step in range(steps):
        idx = torch.randperm(n, generator=gen)[:batch]
        same = codes[idx][:, None] == codes[idx][None, :]
        # one negative per image and per report, uniform among the batch's true negatives
        w = (~same).float()
        t_for_i = torch.multinomial(w + 1e-12 * (w.sum(1, keepdim=True) == 0), 1, generator=gen)[:, 0]
        i_for_t = torch.multinomial(w.T + 1e-12 * (w.T.sum(1, keepdim=True) == 0), 1, generator=gen)[:, 0]
        img_rows = torch.cat([idx, idx, idx[i_for_t]])
        txt_rows = torch.cat([idx, idx[t_for_i], idx])
        target = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long()
        text, padding = trim(feats["text"][txt_rows], feats["padding"][txt_rows])
        logits = matcher(feats["image"][img_rows], text, padding)
        loss = F.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    matcher.eval()
    return losses


def matcher_scores(matcher):
    def score(feats):
        def fn(i, t):
            text, padding = trim(feats["text"][t], feats["padding"][t])
            logits = matcher(feats["image"][i], text, padding)
            return logits[:, 1] - logits[:, 0]
        return fn
    return score


def diagnose(checkpoint: str, dataset: str, args) -> dict:
    from medvlp.data.manifest import read_manifest
    from medvlp.eval.retrieval_itm import pool_indices
    from medvlp.hub import load_bundle
    from medvlp.models.fusion import FusionEncoder
    from medvlp.models.heads import ItmHead

    bundle = load_bundle(checkpoint, device="cpu")
    method, cfg = bundle.method.eval(), bundle.cfg
    for p in method.parameters():
        p.requires_grad_(False)
    train_s = read_manifest(dataset, [cfg.data.train_split])
    test_s = read_manifest(dataset, ["test"])
    train_s = [train_s[i] for i in pool_indices([s.id for s in train_s], args.train_pairs)]
    test_s = [test_s[i] for i in pool_indices([s.id for s in test_s], args.test_pairs)]
    t0 = time.perf_counter()
    train_f = tower_features(method, train_s, cfg, bundle.tokenizer, bundle.classes)
    test_f = tower_features(method, test_s, cfg, bundle.tokenizer, bundle.classes)
    gen = torch.Generator().manual_seed(0)
    test_neg = negatives(test_f["texts"], gen)
    rows = {}
    if "itc" in test_f:
        ei, et = test_f["itc"]
        rows["ITC cosine"] = {"auroc": heldout_auroc(lambda i, t: (ei[i] * et[t]).sum(-1), test_f, test_neg)}
    m = cfg.method
    width = method.image_to_fusion.out_features
    variants = {"checkpoint": lambda: Matcher(*(copy.deepcopy(x) for x in (method.image_to_fusion, method.text_to_fusion,
                                                                          method.fusion, method.itm_head)))}
    variants["checkpoint+steps"] = variants["checkpoint"]
    for depth in args.depths:
        variants[f"fresh depth {depth}"] = lambda depth=depth: Matcher(
            nn.Linear(method.vision.width, width), nn.Linear(method.text.width, width),
            FusionEncoder(width, depth, m.fusion_heads, m.fusion_mlp_ratio), ItmHead(2 * width))
    for name, make in variants.items():
        torch.manual_seed(0)
        matcher = make()
        for p in matcher.parameters():
            p.requires_grad_(True)
        losses = []
        if name != "checkpoint":
            t1 = time.perf_counter()
            losses = train_matcher(matcher, train_f, args.steps, args.batch, args.lr, torch.Generator().manual_seed(1))
            print(f"  {name}: {args.steps} steps in {time.perf_counter() - t1:.0f} s", flush=True)
        auroc = heldout_auroc(matcher_scores(matcher)(test_f), test_f, test_neg)
        tail = losses[-50:]
        rows[name] = {"auroc": auroc, "loss_first_50": float(np.mean(losses[:50])) if losses else None,
                      "loss_last_50": float(np.mean(tail)) if tail else None}
        print(f"  {name}: held-out AUROC {auroc:.3f}, loss last 50 {rows[name]['loss_last_50']}", flush=True)
    return {"checkpoint": checkpoint, "method": cfg.method.name, "n_train": int(train_f["image"].shape[0]),
            "n_test": int(test_f["image"].shape[0]), "seconds": time.perf_counter() - t0, "rows": rows}


def markdown(data) -> str:
    m = data["machine"]
    lines = ["# ITM diagnosis: can the fusion encoder learn matching on the trained unimodal features?", "",
             f"Command: `{data['command']}`  ",
             f"Machine: {m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')}, commit "
             f"{(m.get('git_commit') or '?')[:10]}{' (dirty)' if m.get('git_dirty') else ''}  ",
             f"Date: {data['date']}", "",
             f"Towers frozen; {data['steps']} steps x {data['batch']} positives (+ 2 x {data['batch']} uniform "
             f"negatives), AdamW lr {data['lr']}. Held-out AUROC of the ITM log-odds: test positives against one "
             f"uniform negative per test image (0.5 = no signal). Training loss at the prior: {PRIOR:.4f}.", "",
             "| checkpoint | variant | held-out AUROC | loss, first 50 steps | loss, last 50 steps |",
             "|---|---|---:|---:|---:|"]
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    for r in data["results"]:
        name = "/".join(Path(r["checkpoint"]).parts[-2:-1]) or r["checkpoint"]
        for variant, row in r["rows"].items():
            lines.append(f"| {name} ({r['method']}) | {variant} | {row['auroc']:.3f} | "
                         f"{fmt(row.get('loss_first_50'))} | {fmt(row.get('loss_last_50'))} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    from medvlp.bench import machine_info, utc_now

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", action="append", required=True, help="checkpoint or run folder (repeatable)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--train-pairs", type=int, default=2048, help="pre-training pairs (capped at the split's size)")
    p.add_argument("--test-pairs", type=int, default=512)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--depths", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    p.add_argument("--name", default="itm_diagnosis")
    p.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    for ckpt in args.checkpoint:
        print(f"[{ckpt}]", flush=True)
        results.append(diagnose(ckpt, args.dataset, args))
    data = {"command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
            "date": utc_now(), "machine": machine_info(), "steps": args.steps, "batch": args.batch, "lr": args.lr,
            "prior": PRIOR, "results": results}
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
