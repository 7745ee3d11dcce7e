"""Step-time benchmark: medvlp's CLIP training step against open_clip's, same architecture.

Both models are built in one process with one torch (the venv made by
``benchmarks/setup_openclip_env.sh``), fed identical random inputs, and timed in
alternating blocks (medvlp first on even rounds, open_clip first on odd ones) so that
machine drift hits both sides alike. One step is the full training step of medvlp's loop:
forward (under autocast for ``--precision bf16``) + loss, backward, gradient clipping at
1.0, fused AdamW step, ``zero_grad`` and the logit-scale clamp.

The architecture is the DESIGN.md reference: ViT 192 wide x 6 layers x 3 heads on 96 px
RGB images in 16 px patches; the same BERT (256 x 4 x 4, context 64, dropout 0.1, vocabulary
of a WordPiece tokenizer trained here) on both sides, given to open_clip as a local
Hugging Face config with [CLS] pooling of the last hidden state; 128-d embeddings; batch 64.
Differences that cannot be configured away are listed in ``DIFFERENCES`` and in the output.

Peak RSS is per process, so it is measured in two short subprocesses (``--only medvlp`` and
``--only openclip``) that each import the same packages and build one side.

    benchmarks/.envs/openclip/bin/python benchmarks/step_time.py                    # fp32
    benchmarks/.envs/openclip/bin/python benchmarks/step_time.py --precision bf16

Results: ``benchmarks/results/step_time.json`` (one entry per precision) and
``benchmarks/results/step_time.md`` (regenerated from the JSON).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import random
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import namedtuple
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

BENCHMARK, VERSION = "step_time", 1
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SETUP_SCRIPT = "benchmarks/setup_openclip_env.sh"
VENV_PYTHON = "benchmarks/.envs/openclip/bin/python"
ARCH = dict(image_size=96, patch_size=16, in_chans=3, vision_width=192, vision_depth=6, vision_heads=3,
            text_width=256, text_depth=4, text_heads=4, context_length=64, embed_dim=128, vocab_size=4000)
DIFFERENCES = [
    "ViT attention: open_clip's default block runs nn.MultiheadAttention (packed in_proj, need_weights=False); "
    "medvlp's block runs its own qkv Linear + F.scaled_dot_product_attention",
    "ViT patch embedding: open_clip's conv has no bias, medvlp's has one (192 parameters)",
    "ViT image projection: an open_clip (192, 128) Parameter vs a bias-free medvlp Linear (same math)",
    "ViT position embedding: fixed 2-D sin-cos on both sides; open_clip's (sin_cos_2d) also covers [CLS] and is a "
    "frozen Parameter (counted in its total, not trainable), medvlp's covers patches only and is a buffer",
    "Initialisation differs (open_clip: normal, width^-0.5 scales; medvlp: MAE Xavier-uniform): no effect on time",
    "Text: one BertConfig for both; open_clip AutoModel.from_config, medvlp BertModel(add_pooling_layer=False); "
    "no pooler layer on either side (open_clip hf_pooler_type=cls_last_hidden_state_pooler)",
    "Loss: open_clip ClipLoss vs medvlp ClipLoss (fp32 logits outside autocast; identical-text mask off)",
]


def fail(message: str, code: int = 2) -> None:
    print(f"step_time: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def import_openclip():
    try:
        import open_clip
    except ImportError as exc:
        fail(f"open_clip is not importable with {sys.executable} ({exc}).\n"
             f"  Create its environment with:  bash {SETUP_SCRIPT}\n"
             f"  then run:  {VENV_PYTHON} benchmarks/step_time.py")
    return open_clip


# --------------------------------------------------------------------------- inputs


def make_tokenizer(vocab_size: int, seed: int):
    """A WordPiece tokenizer trained on a random corpus large enough to fill ``vocab_size``."""
    from medvlp.data.tokenize import train_wordpiece

    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(6000)]
    texts = [" ".join(rng.choices(words, k=40)) for _ in range(3000)]
    return train_wordpiece(texts, vocab_size)


def make_inputs(batch: int, vocab: int, pad_id: int, seed: int) -> "Inputs":
    """Random images and token ids of random lengths ([CLS] ... [SEP] then padding)."""
    g = torch.Generator().manual_seed(seed)
    length = ARCH["context_length"]
    images = torch.randn(batch, ARCH["in_chans"], ARCH["image_size"], ARCH["image_size"], generator=g)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    lengths = torch.randint(length // 4, length + 1, (batch,), generator=g)
    pos = torch.arange(length)[None]
    ids[:, 0] = 2  # [CLS]
    ids[torch.arange(batch), lengths - 1] = 3  # [SEP]
    mask = (pos < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, pad_id)
    return Inputs(images, ids, mask)


Inputs = namedtuple("Inputs", "images input_ids attention_mask")


# --------------------------------------------------------------------------- the two sides


@dataclass
class Side:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[], torch.Tensor]
    after_step: Callable[[], None]


def adamw(groups: list[dict], tcfg) -> torch.optim.Optimizer:
    """The same AdamW for both sides: medvlp's hyper-parameters, fused when available."""
    kwargs = dict(lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)


def medvlp_config():
    from medvlp.config import load_config

    keys = {"model.vision.image_size": "image_size", "model.vision.patch_size": "patch_size",
            "model.vision.in_chans": "in_chans", "model.vision.width": "vision_width",
            "model.vision.depth": "vision_depth", "model.vision.heads": "vision_heads", "model.text.width": "text_width",
            "model.text.depth": "text_depth", "model.text.heads": "text_heads",
            "model.text.max_length": "context_length", "model.embed_dim": "embed_dim"}
    fixed = ["model.text.name=bert", "method.name=clip", "method.mask_identical_texts=false"]
    return load_config(None, [f"{k}={ARCH[v]}" for k, v in keys.items()] + fixed)


def build_medvlp(cfg, tokenizer, inputs: Inputs, seed: int) -> Side:
    import medvlp.methods  # noqa: F401  (registers the methods)
    from medvlp.data.sample import Batch
    from medvlp.hub import build_method
    from medvlp.train.optim import build_optimizer

    torch.manual_seed(seed)
    method = build_method(cfg, tokenizer).train()
    b = inputs.images.shape[0]
    batch = Batch(images=inputs.images, input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                  texts=[f"report {i}" for i in range(b)], has_text=torch.ones(b, dtype=torch.bool))
    optimizer = build_optimizer(method, cfg.train, torch.device("cpu"))
    return Side("medvlp", method, optimizer, lambda: method(batch)["loss"], lambda: method.after_optimizer_step(0))


def build_openclip(open_clip, cfg, tokenizer, inputs: Inputs, seed: int, *, text_dir: Path) -> Side:
    a = ARCH
    model_cfg = {
        "embed_dim": a["embed_dim"],
        "vision_cfg": {"image_size": a["image_size"], "patch_size": a["patch_size"], "width": a["vision_width"],
                       "layers": a["vision_depth"], "head_width": a["vision_width"] // a["vision_heads"],
                       "mlp_ratio": 4.0, "no_ln_pre": True, "pos_embed_type": "sin_cos_2d",
                       "norm_kwargs": {"eps": 1e-6}},
        "text_cfg": {"hf_model_name": str(text_dir), "hf_tokenizer_name": str(text_dir),
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "hf_proj_type": "linear",
                     "context_length": a["context_length"]},
    }
    name = "medvlp-parity-vit192-bert256"
    (text_dir / f"{name}.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(text_dir / f"{name}.json")
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None, pretrained_text=False, output_dict=True).train()
    loss_fn = open_clip.ClipLoss()
    groups = [{"params": [], "weight_decay": cfg.train.weight_decay}, {"params": [], "weight_decay": 0.0}]
    for n, p in model.named_parameters():  # open_clip's own rule (its training/main.py)
        if p.requires_grad:
            skip = p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
            groups[skip]["params"].append(p)

    def loss() -> torch.Tensor:
        out = model(inputs.images, inputs.input_ids)
        return loss_fn(out["image_features"], out["text_features"], out["logit_scale"])

    def clamp() -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    return Side("openclip", model, adamw(groups, cfg.train), loss, clamp)


def build_sides(which: list[str], args) -> tuple[list[Side], dict]:
    from medvlp.data.tokenize import save_tokenizer
    from medvlp.models.text import build_text_encoder

    open_clip = import_openclip()
    tokenizer = make_tokenizer(ARCH["vocab_size"], args.seed)
    cfg = medvlp_config()
    inputs = make_inputs(args.batch_size, len(tokenizer), tokenizer.pad_token_id, args.seed)
    sides = []
    with tempfile.TemporaryDirectory(prefix="step_time_") as tmp:
        text_dir = Path(tmp)  # the exact BertConfig medvlp builds, and its tokenizer, for open_clip's HF tower
        build_text_encoder(cfg.model.text, tokenizer).save_config(text_dir)
        save_tokenizer(tokenizer, text_dir)
        baseline_rss = rss_gib()  # every import done, no model kept yet
        for name in which:
            build = build_medvlp if name == "medvlp" else partial(build_openclip, open_clip, text_dir=text_dir)
            sides.append(build(cfg, tokenizer, inputs, args.seed))
    info = {"vocab_size": len(tokenizer), "open_clip_version": open_clip.__version__,
            "mean_text_tokens": float(inputs.attention_mask.sum(1).float().mean()), "baseline_rss_gib": baseline_rss}
    return sides, info


# --------------------------------------------------------------------------- measuring


def train_step(side: Side, amp: bool) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss = side.loss()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(side.model.parameters(), 1.0)
    side.optimizer.step()
    side.optimizer.zero_grad(set_to_none=True)
    side.after_step()
    if not math.isfinite(float(loss.detach())):
        fail(f"{side.name}: non-finite loss")
    return time.perf_counter() - start


def summarize(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_step_time_s": statistics.median(times), "q25_step_time_s": q[0], "q75_step_time_s": q[2],
            "iqr_step_time_s": q[2] - q[0], "mean_step_time_s": statistics.fmean(times), "n_steps": len(times)}


def flops_per_step(side: Side, amp: bool) -> int:
    """Forward + backward FLOPs counted by torch's FlopCounterMode (matmuls, convolutions
    and the SDPA kernels it has formulas for; CPU fused attention is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        side.loss().backward()
    side.optimizer.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def param_counts(model: torch.nn.Module) -> dict:
    return {"total": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def rss_gib() -> float:
    """Peak resident set size of this process so far, GiB.

    Linux: VmHWM of /proc/self/status, which starts afresh at exec. ``ru_maxrss`` is kept
    across fork + exec, so a child of a large parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_only(args) -> None:
    """Subprocess mode: one side, a few steps; print one JSON line with its peak RSS."""
    sides, info = build_sides([args.only], args)
    side = sides[0]
    times = [train_step(side, args.precision == "bf16") for _ in range(args.warmup + args.steps)]
    print(json.dumps({"side": args.only, "baseline_rss_gib": info["baseline_rss_gib"], "peak_rss_gib": rss_gib(),
                      "median_step_time_s": statistics.median(times[args.warmup:])}))


def peak_rss(side: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", side, "--precision", args.precision,
           "--threads", str(args.threads), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
           "--warmup", "2", "--steps", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        fail(f"peak-RSS subprocess for {side} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_info() -> dict:
    def sh(cmd: str) -> str:
        return subprocess.run(shlex.split(cmd), capture_output=True, text=True, cwd=REPO).stdout.strip()

    lscpu = dict(line.split(":", 1) for line in sh("lscpu").splitlines() if ":" in line)
    flags = lscpu.get("Flags", "").split()
    import medvlp

    mem_kib = int(next((ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                        if ln.startswith("MemTotal")), 0))
    return {
        "cpu_model": lscpu.get("Model name", platform.processor()).strip(), "cpu_count": os.cpu_count(),
        "cpu_bf16_flags": [f for f in flags if "bf16" in f or f.startswith("amx")],
        "gpu": "none (CPU run)", "ram_gib": round(mem_kib / 2**20, 1), "os": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__,
        "medvlp": getattr(medvlp, "__version__", "unknown"),
        "git_commit": sh("git rev-parse HEAD"), "git_dirty": bool(sh("git status --porcelain")),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch_num_threads": torch.get_num_threads(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
    }


def benchmark(args) -> dict:
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    t0, load_start = time.perf_counter(), round(os.getloadavg()[0], 2)
    amp = args.precision == "bf16"
    sides, info = build_sides(["medvlp", "openclip"], args)
    print(f"built both sides (vocab {info['vocab_size']}); warm-up {args.warmup} steps each", flush=True)
    for side in sides:
        for _ in range(args.warmup):
            train_step(side, amp)
    times: dict[str, list[float]] = {s.name: [] for s in sides}
    round_ratios = []  # paired per round: robust to load that drifts between rounds
    for r in range(args.rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            times[side.name] += [train_step(side, amp) for _ in range(args.steps)]
        round_ratios.append(statistics.median(times["medvlp"][-args.steps:])
                            / statistics.median(times["openclip"][-args.steps:]))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{k} {statistics.median(v[-args.steps:]):.3f} s" for k, v in times.items()), flush=True)
    flops = {s.name: flops_per_step(s, amp) for s in sides}
    attn_impl = {s.name: next((m.config._attn_implementation for m in s.model.modules()
                               if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")), None)
                 for s in sides}
    params = {s.name: param_counts(s.model) for s in sides}
    del sides
    print("measuring peak RSS in two subprocesses", flush=True)
    rss = {name: peak_rss(name, args) for name in ("medvlp", "openclip")}
    metrics = {name: {**summarize(times[name]), "peak_rss_gib": rss[name]["peak_rss_gib"],
                      "baseline_rss_gib": rss[name]["baseline_rss_gib"], "params": params[name],
                      "fwd_bwd_flops_counted": flops[name], "text_attn_implementation": attn_impl[name]}
               for name in times}
    med = {k: v["median_step_time_s"] for k, v in metrics.items()}
    metrics["ratio_medvlp_over_openclip"] = med["medvlp"] / med["openclip"]
    metrics["ratio_per_round_median"] = statistics.median(round_ratios)
    metrics["ratio_per_round"] = round_ratios
    return {
        "benchmark": BENCHMARK, "version": VERSION,
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, REPO)
                                                     if sys.executable.startswith(str(REPO)) else sys.executable,
                                                     "benchmarks/step_time.py", *sys.argv[1:]]),
        "machine": machine_info(),
        "config": {"arch": ARCH, "batch_size": args.batch_size, "precision": args.precision,
                   "threads": args.threads, "warmup_steps": args.warmup, "rounds": args.rounds,
                   "steps_per_block": args.steps, "optimizer": "AdamW (fused) lr 5e-4 wd 0.1 betas (0.9, 0.98) eps 1e-6",
                   "grad_clip": 1.0, "open_clip_version": info["open_clip_version"], "seed": args.seed},
        "data": {"generator": "random: images N(0,1); token ids uniform, lengths uniform in [16, 64]",
                 "seed": args.seed, "mean_text_tokens": info["mean_text_tokens"], "vocab_size": info["vocab_size"]},
        "budget": {"timed_steps_per_side": args.rounds * args.steps, "batch_size": args.batch_size,
                   "wall_time_s": round(time.perf_counter() - t0, 1),
                   "load_average_1m_at_start": load_start},
        "metrics": metrics, "differences": DIFFERENCES,
        "started_at": started, "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- output


def render_markdown(runs: dict) -> str:
    first = next(iter(runs.values()))
    m = first["machine"]
    return "\n".join([
        "# Step time: medvlp CLIP vs open_clip (same architecture, one process)", "",
        "Generated by `benchmarks/step_time.py` from `step_time.json`; do not edit. Regenerate with:", "",
        *[f"    {r['command']}" for r in runs.values()], "",
        f"Machine: {m['cpu_model']} ({m['cpu_count']} CPUs, {m['ram_gib']} GiB), no GPU, torch {m['torch']}, "
        f"{first['config']['threads']} threads, open_clip {first['config']['open_clip_version']}, "
        f"git {m['git_commit'][:10]}{' (dirty)' if m['git_dirty'] else ''}.", "",
        "Ratio: of the two medians, and (in brackets) the median of the per-round ratios.", "",
        "| precision | side | median s/step | IQR s | steps | medvlp / open_clip | peak RSS GiB | params |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {prec} | {side} | {s['median_step_time_s']:.3f} | {s['iqr_step_time_s']:.3f} | {s['n_steps']} | "
          + (f"{met['ratio_medvlp_over_openclip']:.2f}x ({met['ratio_per_round_median']:.2f}x)" if side == "medvlp" else "")
          + f" | {s['peak_rss_gib']:.2f} | {s['params']['total']:,} |"
          for prec, met in ((k, r["metrics"]) for k, r in runs.items())
          for side, s in ((n, met[n]) for n in ("medvlp", "openclip"))],
        "", "Remaining architectural differences:", "", *[f"- {d}" for d in first["differences"]], "",
    ])


def write_results(record: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "step_time.json"
    runs = {}
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("version") == VERSION and all(r["machine"]["cpu_model"] == record["machine"]["cpu_model"]
                                                 for r in old.get("runs", {}).values()):
            runs = old["runs"]
    runs[record["config"]["precision"]] = record
    runs = dict(sorted(runs.items()))
    path.write_text(json.dumps({"benchmark": BENCHMARK, "version": VERSION, "runs": runs}, indent=2) + "\n")
    (RESULTS / "step_time.md").write_text(render_markdown(runs))
    print(f"wrote {path.relative_to(REPO)} and step_time.md")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = CPU autocast on both sides")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side before timing")
    p.add_argument("--rounds", type=int, default=10, help="alternating rounds")
    p.add_argument("--steps", type=int, default=4, help="timed steps per side per round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["medvlp", "openclip"], help="internal: one side, print peak RSS as JSON")
    p.add_argument("--no-write", action="store_true", help="print the JSON instead of writing results/")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import_openclip()
    torch.set_num_threads(args.threads)
    if args.only:
        run_only(args)
        return
    record = benchmark(args)
    if args.no_write:
        print(json.dumps(record, indent=2))
    else:
        write_results(record)
    met = record["metrics"]
    print(f"{args.precision}: medvlp {met['medvlp']['median_step_time_s']:.3f} s/step, open_clip "
          f"{met['openclip']['median_step_time_s']:.3f} s/step, ratio {met['ratio_medvlp_over_openclip']:.2f}")


if __name__ == "__main__":
    main()
