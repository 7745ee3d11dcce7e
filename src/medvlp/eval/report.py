"""Evaluation report: ``metrics.json``, ``report.md``, ``roc.png`` and label-efficiency plots.

``results`` maps a model name to its metrics, as returned by
:func:`medvlp.eval.runner.evaluate_models`: ``{"zeroshot": ..., "retrieval": ...,
"linear_probe": ...}`` (any subset). ``report.md`` is one markdown table with a column
per model; ``roc.png`` draws the zero-shot ROC curves, one subplot per class and one
line per model (only written when zero-shot results are present);
``label_efficiency_<task>.png`` (:func:`medvlp.eval.plots.plot_label_efficiency`) draws
each label-fraction task's headline metric against the fraction, embedded in
``report.md`` under "Label efficiency".
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medvlp.eval.plots import FRACTION_TASKS, plot_label_efficiency

NA = "n/a"
SKIPPED = "skipped"  # a task that did not apply to the model (reason in the notes)


def _jsonable(obj: Any) -> Any:
    """NumPy / tensor scalars -> Python; NaN and inf -> None (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if hasattr(obj, "item") and callable(obj.item):
        return _jsonable(obj.item())
    return obj


def _num(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return NA
    return f"{value:.3f}"


def _num_sd(entry: Mapping[str, Any], key: str, sd_key: str = "sd") -> str:
    """``mean ± sd`` of one fraction entry (``n/a`` when the mean is undefined)."""
    value = _num(entry.get(key))
    sd = entry.get(sd_key)
    return value if value == NA or sd is None else f"{value} ± {sd:.3f}"


def _rows(results: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, list[str]]]:
    """(row label, one cell per model) for every metric any model has."""
    models = list(results)
    rows: list[tuple[str, list[str]]] = []

    def add(label: str, getter) -> None:
        cells = []
        for name in models:
            try:
                cells.append(getter(results[name]))
            except KeyError as exc:
                # the missing key is the task itself when the runner skipped it for this model
                skipped = (results[name].get("meta") or {}).get("skipped_tasks") or {}
                cells.append(SKIPPED if exc.args and exc.args[0] in skipped else "")
            except TypeError:
                cells.append("")
        if any(c and c != SKIPPED for c in cells):
            rows.append((label, cells))

    classes: list[str] = []
    for metrics in results.values():
        for c in (metrics.get("zeroshot") or {}).get("per_class", {}):
            if c not in classes:
                classes.append(c)
    add("zero-shot mean AUROC", lambda m: _num(m["zeroshot"]["mean"]))
    add("zero-shot mean AUROC, learned prompts", lambda m: _num(m["zeroshot_learned"]["mean"]))
    for c in classes:
        add(f"zero-shot AUROC: {c}", lambda m, c=c: _num(m["zeroshot"]["per_class"][c]))
    for direction, arrow in (("image_to_text", "image→text"), ("text_to_image", "text→image")):
        for k in (1, 5, 10):
            add(f"{arrow} R@{k}", lambda m, d=direction, k=k: _num(m["retrieval"][d][f"R@{k}"]))
    for direction, arrow in (("image_to_text", "image→text"), ("text_to_image", "text→image")):
        for k in (1, 5, 10):
            add(
                f"{arrow} label P@{k}",
                lambda m, d=direction, k=k: _num(m["retrieval"]["label_precision"][d][f"P@{k}"]),
            )
    for direction, arrow in (("image_to_text", "image→text"), ("text_to_image", "text→image")):
        for k in (1, 10):
            add(f"{arrow} R@{k}, ITC top-k re-ranked by ITM",
                lambda m, d=direction, k=k: _num(m["retrieval_itm"]["rerank"][d][f"R@{k}"]))
        for k in (1, 10):
            add(f"{arrow} R@{k}, ITM over the pool (chance)",
                lambda m, d=direction, k=k: f"{_num(m['retrieval_itm']['pool']['itm'][d][f'R@{k}'])} "
                f"({_num(m['retrieval_itm']['pool']['chance'][f'R@{k}'])})")
            add(f"{arrow} R@{k}, ITC over the pool (chance)",
                lambda m, d=direction, k=k: f"{_num(m['retrieval_itm']['pool']['itc'][d][f'R@{k}'])} "
                f"({_num(m['retrieval_itm']['pool']['chance'][f'R@{k}'])})")
    fraction_keys: list[str] = []
    for metrics in results.values():
        for key in (metrics.get("linear_probe") or {}).get("fractions", {}):
            if key not in fraction_keys:
                fraction_keys.append(key)
    for key in sorted(fraction_keys, key=float):

        def probe_cell(m, key=key) -> str:
            entry = m["linear_probe"]["fractions"][key]
            if entry["mean"] is None or not math.isfinite(entry["mean"]):
                return NA
            return f"{entry['mean']:.3f} ± {entry['sd']:.3f}"

        add(f"linear probe AUROC @{float(key) * 100:g}%", probe_cell)
    add("own classification head: mean AUROC", lambda m: _num(m["supervised_head"]["mean"]))
    tuned: list[str] = []
    for metrics in results.values():
        tuned += [k for k in (metrics.get("prompt_tuning") or {}).get("fractions", {}) if k not in tuned]
    for key in sorted(tuned, key=float):
        add(f"prompt tuning AUROC @{float(key) * 100:g}%",
            lambda m, key=key: _num_sd(m["prompt_tuning"]["fractions"][key], "mean"))
    for kind in ("overall", "closed", "open"):
        add(f"VQA {kind} accuracy (question-only / image-shuffled)",
            lambda m, k=kind: f"{_num(m['vqa']['model'][k]['mean'])} ({_num(m['vqa']['question_only'][k]['mean'])} / "
            f"{_num(m['vqa']['image_shuffled'][k]['mean'])})")
    for task, title, key, sd_key in (("finetune", "fine-tuning AUROC", "mean", "sd"),
                                     ("segmentation", "segmentation Dice", "dice", "sd"),
                                     ("segmentation", "segmentation Dice, large classes", "dice_large", "sd_large"),
                                     ("detection", "detection mAP@0.5", "map_50", "sd"),
                                     ("detection", "detection mAP@[.5:.95]", "map_50_95", "map_50_95_sd")):
        keys: list[str] = []
        for metrics in results.values():
            keys += [k for k in (metrics.get(task) or {}).get("fractions", {}) if k not in keys]
        for fk in sorted(keys, key=float):
            add(f"{title} @{float(fk) * 100:g}%",
                lambda m, t=task, fk=fk, key=key, sd_key=sd_key: _num_sd(m[t]["fractions"][fk], key, sd_key))
    add("localisation: pointing game (chance)", lambda m: f"{_num(m['localization']['pointing_game']['mean'])} "
        f"({_num(m['localization']['chance']['pointing_game']['mean'])})")
    add("localisation: top-k IoU (chance)", lambda m: f"{_num(m['localization']['iou_topk']['mean'])} "
        f"({_num(m['localization']['chance']['iou_topk']['mean'])})")
    add("localisation, word map: pointing game", lambda m: _num(m["localization"]["words"]["pointing_game"]["mean"]))
    add("localisation, word map: top-k IoU", lambda m: _num(m["localization"]["words"]["iou_topk"]["mean"]))
    return rows


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table, one row per metric and one column per model."""
    models = list(results)
    rows = _rows(results)
    lines = ["| metric | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join(lines)


def _notes(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    notes = []
    for name, metrics in results.items():
        for task, why in ((metrics.get("meta") or {}).get("skipped_tasks") or {}).items():
            notes.append(f"- {name}: {task} skipped ({why})")
        undefined = (metrics.get("zeroshot") or {}).get("undefined") or []
        if undefined:
            notes.append(
                f"- {name}: zero-shot AUROC undefined (only one label value in the test set, "
                f"excluded from the mean) for: {', '.join(undefined)}"
            )
        test_only = (metrics.get("detection") or {}).get("unscored_test_only") or []
        if test_only:
            notes.append(f"- {name}: detection: classes with test boxes but no training box, not scored: "
                         f"{', '.join(test_only)}")
        large = (metrics.get("segmentation") or {}).get("large_classes")
        if large is not None:
            notes.append(f"- {name}: segmentation: large classes (median mask at least one patch): "
                         f"{', '.join(large) if large else 'none'}")
        for key, entry in ((metrics.get("linear_probe") or {}).get("fractions") or {}).items():
            if entry.get("degenerate_classes"):
                notes.append(
                    f"- {name}: linear probe @{float(key) * 100:g}%: classes with a single label value "
                    f"in the training fraction (constant score): {', '.join(entry['degenerate_classes'])}"
                )
    return notes


def plot_roc(results: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path | None:
    """Zero-shot ROC curves: one subplot per class, one line per model (Agg backend)."""
    # An explicit Agg canvas: no pyplot global state, works headless, never changes the user's backend
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = {name: (m.get("zeroshot") or {}).get("roc") or {} for name, m in results.items()}
    classes: list[str] = []
    for per_model in curves.values():
        classes += [c for c in per_model if c not in classes]
    if not classes:
        return None
    ncols = min(4, len(classes))
    nrows = math.ceil(len(classes) / ncols)
    fig = Figure(figsize=(3.2 * ncols, 3.2 * nrows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, cls in zip(axes.flat, classes):
        for name, per_model in curves.items():
            if cls in per_model:
                auc = results[name]["zeroshot"]["per_class"].get(cls)
                ax.plot(per_model[cls]["fpr"], per_model[cls]["tpr"], label=f"{name} ({_num(auc)})")
        ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=0.8)
        ax.set_title(cls, fontsize=9)
        ax.set_xlabel("false positive rate", fontsize=8)
        ax.set_ylabel("true positive rate", fontsize=8)
        ax.legend(fontsize=6, loc="lower right")
    for ax in list(axes.flat)[len(classes) :]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(results: Mapping[str, Mapping[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """Write metrics.json, report.md, (with zero-shot results) roc.png and the label-efficiency plots into ``out_dir``.

    Returns ``{"metrics": path, "report": path, "roc": path}`` (``"roc"`` only when drawn); the
    label-efficiency plots are ``out_dir/label_efficiency_<task>.png``, one per task of
    :data:`medvlp.eval.plots.FRACTION_TASKS` with results (see :func:`plot_label_efficiency`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    paths["metrics"] = out_dir / "metrics.json"
    _atomic_write(paths["metrics"], json.dumps(_jsonable(results), indent=2) + "\n")
    roc = plot_roc(results, out_dir / "roc.png")
    for stale in out_dir.glob("label_efficiency_*.png"):  # a previous report's plots would mislead
        stale.unlink()
    curves = plot_label_efficiency(results, out_dir)
    parts = ["# medvlp evaluation report", "", format_table(results), ""]
    notes = _notes(results)
    if notes:
        parts += ["## Notes", "", *notes, ""]
    parts += [
        "AUROC masks uncertain and missing labels; cells per label fraction are mean ± sd over seeds.",
        "Full numbers are in `metrics.json`.",
    ]
    if roc is not None:
        parts += ["", "![zero-shot ROC curves](roc.png)"]
        paths["roc"] = roc
    if curves:
        parts += ["", "## Label efficiency", ""]
        for path in curves:
            spec = FRACTION_TASKS[path.stem.removeprefix("label_efficiency_")]
            parts += [f"![{spec.title}: {spec.metric} vs label fraction]({path.name})", ""]
    paths["report"] = out_dir / "report.md"
    _atomic_write(paths["report"], "\n".join(parts) + "\n")
    return paths
