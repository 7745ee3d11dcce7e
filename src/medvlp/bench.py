"""Shared pieces of the benchmark scripts (``benchmarks/``): what a result is measured on
and how results are summarised.

- :func:`dataset_version`: the benchmark version of a dataset folder (generator version,
  preset / benchmark name when the generator wrote them, SHA-256 of ``manifest.jsonl``).
  Results of different versions never share a table (:func:`check_same_version`).
- :func:`machine_info`: CPU model, cores, GPU, torch, git commit, threads.
- :func:`step_flops`: FLOPs of one training step of a method (forward + backward of one
  real batch, counted by ``torch.utils.flop_counter.FlopCounterMode``; the optimizer
  update is not counted).
- :func:`aggregate` / :func:`render_markdown`: per-run results -> mean ± sd per recipe.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import math
import os
import platform
import statistics
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from medvlp.errors import ConfigError

#: layout of a comparison result file; bump when its keys or their meaning change
RESULT_FORMAT = 1


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_version(dataset: str | Path) -> dict:
    """``{"dataset", "generator_version", "preset", "benchmark", "manifest_sha256"}`` of a dataset folder."""
    from medvlp.data.manifest import read_info, resolve_manifest

    info = read_info(dataset)
    return {
        "dataset": info.get("name"),
        "generator_version": info.get("version"),
        "preset": info.get("preset"),
        "benchmark": info.get("benchmark"),
        "manifest_sha256": file_sha256(resolve_manifest(dataset)),
    }


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], check=False, capture_output=True, text=True, cwd=here, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    from medvlp import __version__

    return {
        "cpu": cpu, "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__, "medvlp": __version__,
        "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain", "--", "src", "configs")),
        "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }


def first_batch(cfg, tokenizer, classes: Sequence[str]):
    """The training stream's first batch for ``cfg`` (same sources, mix and collation as the loop)."""
    from medvlp.data.mixed import MixedStream, read_sources
    from medvlp.data.transforms import Preprocess

    stream = MixedStream(read_sources(cfg), Preprocess.from_config(cfg), tokenizer, classes,
                         batch_size=cfg.data.batch_size, max_length=cfg.model.text.max_length,
                         sections=cfg.data.sections, seed=cfg.train.seed, augment=cfg.data.augment,
                         paired_labels=cfg.data.paired_labels)
    return stream.collate([stream.dataset[key] for key in stream.batch_keys(0)])


def step_flops(method: torch.nn.Module, batch, accum_steps: int = 1) -> int:
    """FLOPs of one optimizer step: forward + backward of ``batch`` x ``accum_steps``
    micro-batches. Gradients are cleared afterwards."""
    from torch.utils.flop_counter import FlopCounterMode

    method.train()
    counter = FlopCounterMode(display=False)
    with counter:
        method(batch)["loss"].backward()
    method.zero_grad(set_to_none=True)
    return int(counter.get_total_flops()) * int(accum_steps)


# --------------------------------------------------------------------------- aggregation


def stats(values: Iterable[Any]) -> dict:
    """Mean, sample sd and count of the finite numbers among ``values`` (None when none)."""
    xs = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not xs:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def check_same_version(results: Sequence[dict]) -> dict:
    """The one benchmark version all ``results`` share; ConfigError naming the runs otherwise."""
    versions: dict[str, list[str]] = {}
    for r in results:
        key = repr(sorted(r["benchmark"].items()))
        versions.setdefault(key, []).append(f"{r['recipe']}-seed{r['seed']}")
    if len(versions) > 1:
        groups = "; ".join(f"{runs} -> {key}" for key, runs in versions.items())
        raise ConfigError(f"results of different benchmark versions cannot be aggregated: {groups}. Fix: run every "
                          "cell on the same dataset (same generator version and manifest) and runner format, "
                          "in a fresh --out folder")
    return dict(results[0]["benchmark"]) if results else {}


#: (metric key in a result's "metrics", column title) in table order
COLUMNS = [
    ("zeroshot_auroc", "zero-shot AUROC"),
    ("zeroshot_learned_auroc", "zero-shot AUROC (learned prompts)"),
    ("probe_auroc@0.01", "probe AUROC 1 %"),
    ("probe_auroc@0.1", "probe AUROC 10 %"),
    ("probe_auroc@1", "probe AUROC 100 %"),
    ("i2t_R@1", "i→t R@1"), ("i2t_R@5", "i→t R@5"), ("i2t_R@10", "i→t R@10"),
    ("t2i_R@1", "t→i R@1"), ("t2i_R@5", "t→i R@5"), ("t2i_R@10", "t→i R@10"),
    ("itm_rerank_i2t_R@1", "i→t R@1, ITM re-ranked"), ("itm_rerank_i2t_R@10", "i→t R@10, ITM re-ranked"),
    ("itm_rerank_t2i_R@1", "t→i R@1, ITM re-ranked"), ("itm_rerank_t2i_R@10", "t→i R@10, ITM re-ranked"),
    ("itm_pool_i2t_R@10", "pool i→t R@10, ITM"), ("itm_pool_t2i_R@10", "pool t→i R@10, ITM"),
    ("itc_pool_i2t_R@10", "pool i→t R@10, ITC"), ("itc_pool_t2i_R@10", "pool t→i R@10, ITC"),
    ("head_auroc", "head AUROC"),
    ("prompt_tuning_auroc@0.01", "prompt tuning AUROC 1 %"),
    ("pointing_game", "pointing game"), ("iou_top10", "top-10 % IoU"),
    ("pointing_game_words", "pointing game, word map"), ("iou_top10_words", "top-10 % IoU, word map"),
    ("vqa_closed", "VQA acc closed"), ("vqa_open", "VQA acc open"),
    ("vqa_overall", "VQA acc"), ("vqa_question_only", "VQA acc, question only"),
    ("vqa_image_shuffled", "VQA acc, images shuffled"),
    ("finetune_auroc@0.01", "fine-tune AUROC 1 %"), ("seg_dice@0.01", "seg Dice 1 %"), ("seg_dice@1", "seg Dice 100 %"),
    ("seg_dice_large@0.01", "seg Dice large 1 %"), ("seg_dice_large@1", "seg Dice large 100 %"),
    ("det_map50@0.01", "det mAP@0.5 1 %"), ("det_map50@1", "det mAP@0.5 100 %"),
    ("det_map50_95@1", "det mAP@0.5:0.95 100 %"),
    ("steps", "steps"), ("samples_seen", "samples seen"), ("flops_total", "FLOPs"), ("train_minutes", "train min"),
]


def extract_metrics(evaluation: dict) -> dict:
    """The flat numbers of one model's evaluation result (as ``evaluate_models`` returns it)."""
    out: dict[str, float | None] = {}
    if "zeroshot" in evaluation:
        out["zeroshot_auroc"] = evaluation["zeroshot"].get("mean")
    for key, entry in ((evaluation.get("linear_probe") or {}).get("fractions") or {}).items():
        out[f"probe_auroc@{key}"] = entry.get("mean")
    for direction, short in (("image_to_text", "i2t"), ("text_to_image", "t2i")):
        for k, v in ((evaluation.get("retrieval") or {}).get(direction) or {}).items():
            out[f"{short}_{k}"] = v
    itm = evaluation.get("retrieval_itm") or {}
    for part, key, prefix in (("rerank", None, "itm_rerank"), ("pool", "itm", "itm_pool"), ("pool", "itc", "itc_pool")):
        entry = (itm.get(part) or {}) if key is None else ((itm.get(part) or {}).get(key) or {})
        for direction, short in (("image_to_text", "i2t"), ("text_to_image", "t2i")):
            for k, v in (entry.get(direction) or {}).items():
                out[f"{prefix}_{short}_{k}"] = v
    if "supervised_head" in evaluation:
        out["head_auroc"] = evaluation["supervised_head"].get("mean")
    if "zeroshot_learned" in evaluation:
        out["zeroshot_learned_auroc"] = evaluation["zeroshot_learned"].get("mean")
    for key, entry in ((evaluation.get("prompt_tuning") or {}).get("fractions") or {}).items():
        out[f"prompt_tuning_auroc@{key}"] = entry.get("mean")
    vqa = evaluation.get("vqa") or {}
    for part, key in (("model", "vqa_overall"), ("question_only", "vqa_question_only"),
                      ("image_shuffled", "vqa_image_shuffled")):
        if part in vqa:
            out[key] = vqa[part]["overall"]["mean"]
    for kind in ("closed", "open"):
        if kind in (vqa.get("model") or {}):
            out[f"vqa_{kind}"] = vqa["model"][kind]["mean"]
    for key, entry in ((evaluation.get("finetune") or {}).get("fractions") or {}).items():
        out[f"finetune_auroc@{key}"] = entry.get("mean")
    for key, entry in ((evaluation.get("segmentation") or {}).get("fractions") or {}).items():
        out[f"seg_dice@{key}"] = entry.get("dice")
        if "dice_large" in entry:  # the classes at least one patch large (protocol of 2026-11-26 on)
            out[f"seg_dice_large@{key}"] = entry["dice_large"]
    for key, entry in ((evaluation.get("detection") or {}).get("fractions") or {}).items():
        out[f"det_map50@{key}"] = entry.get("map_50")
        out[f"det_map50_95@{key}"] = entry.get("map_50_95")
    loc = evaluation.get("localization") or {}
    if loc.get("pointing_game"):
        out["pointing_game"] = loc["pointing_game"].get("mean")
        out["iou_top10"] = (loc.get("iou_topk") or {}).get("mean")
    if (loc.get("words") or {}).get("pointing_game"):
        out["pointing_game_words"] = loc["words"]["pointing_game"].get("mean")
        out["iou_top10_words"] = (loc["words"].get("iou_topk") or {}).get("mean")
    return out


def aggregate(results: Sequence[dict], recipes: Sequence[str] | None = None) -> dict:
    """Per recipe, mean / sd / n over seeds of every metric and budget number."""
    version = check_same_version(results)
    order = list(recipes or dict.fromkeys(r["recipe"] for r in results))
    table: dict[str, dict] = {}
    for recipe in order:
        runs = sorted((r for r in results if r["recipe"] == recipe), key=lambda r: r["seed"])
        if not runs:
            continue
        keys = list(dict.fromkeys(k for r in runs for k in r["metrics"]))
        table[recipe] = {
            "seeds": [r["seed"] for r in runs],
            "capped_seeds": [r["seed"] for r in runs if r.get("capped")],
            "train": runs[0]["train"],
            "machines": sorted({machine_label(r.get("machine")) for r in runs}),
            # the code versions behind the rows (older results lack trained_at_commit)
            "commits": {"trained": sorted({(r.get("trained_at_commit") or "?")[:10] for r in runs}),
                        "evaluated": sorted({((r.get("machine") or {}).get("git_commit") or "?")[:10] for r in runs})},
            "metrics": {k: stats(r["metrics"].get(k) for r in runs) for k in keys},
        }
    return {"benchmark": version, "recipes": table}


# aggregate metric prefix -> (task, key of the headline value, key of its sd) in a task's fraction entry
_FRACTION_METRICS = {"probe_auroc@": ("linear_probe", "mean", "sd"),
                     "prompt_tuning_auroc@": ("prompt_tuning", "mean", "sd"),
                     "finetune_auroc@": ("finetune", "mean", "sd"),
                     "seg_dice@": ("segmentation", "dice", "sd"),
                     "seg_dice_large@": ("segmentation", "dice_large", "sd_large"),
                     "det_map50@": ("detection", "map_50", "sd")}


def fraction_results(table: dict) -> dict:
    """The aggregate's per-fraction metrics shaped like evaluation results (recipe -> task ->
    ``{"seeds", "fractions": {key: {headline: mean over seeds, sd: sd over seeds}}}``), for
    :func:`medvlp.eval.plots.plot_label_efficiency`."""
    out: dict[str, dict] = {}
    for recipe, r in table.items():
        tasks: dict[str, dict] = {}
        for metric, st in r["metrics"].items():
            prefix, _, fraction = metric.partition("@")
            spec = _FRACTION_METRICS.get(prefix + "@")
            if spec is None or not fraction or st["mean"] is None:
                continue
            task, key, sd_key = spec
            entry = tasks.setdefault(task, {"seeds": r["seeds"], "fractions": {}})["fractions"].setdefault(fraction, {})
            entry.update({key: st["mean"], sd_key: st["sd"]})
        out[recipe] = tasks
    return out


def plot_grid(data: dict, results_dir: str | Path, name: str) -> list[str]:
    """``<name>_label_efficiency_<task>.png`` in ``results_dir``: each recipe's mean over seeds
    against the label fraction, error bars one sd over seeds; returns the file names."""
    from medvlp.eval.plots import plot_label_efficiency

    results_dir = Path(results_dir)
    for stale in results_dir.glob(f"{name}_label_efficiency_*.png"):  # a task no longer in the grid
        stale.unlink()
    return [p.name for p in plot_label_efficiency(fraction_results(data["recipes"]), results_dir, prefix=f"{name}_")]


def machine_label(machine: dict | None) -> str:
    """Short name of the machine a run trained and was evaluated on: its GPU, else its CPU cores."""
    if not machine:
        return "?"
    return machine.get("gpu") or f"CPU, {machine.get('cores', '?')} cores"


def _cell(s: dict | None, key: str, n_seeds: int | None = None) -> str:
    """``mean ± sd``; one value has no spread (``mean``, no ``± 0``), and a metric missing in some
    seeds says over how many it is (``(n=2)``)."""
    if not s or s["mean"] is None:
        return "–"
    mean, sd = s["mean"], s["sd"]
    if key == "flops_total":
        text = f"{mean:.3g}" + (f" ± {sd:.2g}" if s["n"] > 1 else "")
    elif key in ("steps", "samples_seen"):
        text = f"{mean:.0f}" + (f" ± {sd:.0f}" if s["n"] > 1 else "")
    elif key == "train_minutes":
        text = f"{mean:.1f}" + (f" ± {sd:.1f}" if s["n"] > 1 else "")
    else:
        text = f"{mean:.3f}" + (f" ± {sd:.3f}" if s["n"] > 1 else "")
    return text + (f" (n={s['n']})" if n_seeds is not None and s["n"] < n_seeds else "")


def render_markdown(data: dict) -> str:
    """The aggregate as markdown: command, machine, versions, then one row per recipe."""
    b, m = data["benchmark"], data["machine"]
    recipes = data["recipes"]
    keys = [(k, t) for k, t in COLUMNS if any(k in r["metrics"] for r in recipes.values())]
    lines = [
        f"# Comparison: {data['name']}",
        "",
        f"Command: `{data['command']}`  ",
        (f"Aggregated on: {m['cpu']}, {m['cores']} cores, GPU {m['gpu'] or 'none'}, torch {m['torch']}, "
         f"commit {(m.get('git_commit') or '?')[:10]}{' (dirty)' if m.get('git_dirty') else ''}  "),
        f"Date: {data['date']}  ",
        f"Data: {b['data'].get('dataset')} generator v{b['data'].get('generator_version')}"
        + (f", preset {b['data']['preset']}" if b["data"].get("preset") else "")
        + (f", benchmark {b['data']['benchmark']}" if b["data"].get("benchmark") else "")
        + f", manifest sha256 {b['data']['manifest_sha256'][:16]}…  ",
        (f"Budget: {data['budget']['steps']} steps x batch {data['budget']['batch_size']} per recipe, "
         f"wall-time cap {data['budget']['max_minutes']:g} min per run"),
        "",
        "| recipe | n | trained on | ran on | " + " | ".join(t for _, t in keys) + " |",
        "|---|---:|---|---|" + "---:|" * len(keys),
    ]
    for name, r in recipes.items():
        n = len(r["seeds"])
        capped = f" ({len(r['capped_seeds'])} capped)" if r["capped_seeds"] else ""
        cells = [_cell(r["metrics"].get(k), k, n) for k, _ in keys]
        ran_on = ", ".join(r.get("machines") or ["?"])
        lines.append(f"| {name}{capped} | {n} | {r['train']['data']} | {ran_on} | " + " | ".join(cells) + " |")
    lines += ["", "Code per recipe (commits that first trained / evaluated its cells; ? = not recorded):", ""]
    lines += [f"- {name}: trained {', '.join(r['commits']['trained'])}; evaluated {', '.join(r['commits']['evaluated'])}"
              for name, r in recipes.items() if r.get("commits")]
    if data.get("plots"):
        lines += ["", "Label efficiency (mean over seeds, error bars one sd):", ""]
        lines += [f"![{p}]({p})" for p in data["plots"]]
    lines += [
        "",
        ("Mean ± sd over seeds (n = seeds; one seed: the value alone; a metric missing in some seeds: its own n "
         "in brackets). AUROC masks uncertain and missing labels; probe cells are each the mean "
         "of the probe's own seeds. FLOPs = forward + backward of one batch (FlopCounterMode) x steps done, "
         "optimizer excluded. A capped run stopped at the wall-time cap and was evaluated where it stopped."),
    ]
    return "\n".join(lines) + "\n"
