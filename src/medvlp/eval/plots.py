"""Label-efficiency plots of an evaluation report: one PNG per task that trains on label fractions.

``results`` is what :func:`medvlp.eval.runner.evaluate_models` returns (model name -> metrics).
The tasks of :data:`FRACTION_TASKS` report ``{"fractions": {"0.01": entry, "0.1": ..., "1": ...}}``;
each entry holds the task's headline metric (averaged over seeds) and its spread over seeds
(``per_seed`` values where the task keeps them, else ``sd``). :func:`plot_label_efficiency` draws,
per task, the headline metric against the label fraction on a log axis, one line per model, with
error bars of one sample sd over seeds. Figures use an explicit Agg canvas (no pyplot state), so
they render headless and never change the user's matplotlib backend.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np


class FractionTask(NamedTuple):
    """How to read one task's per-fraction results."""

    title: str  # the task in words
    key: str  # the headline metric's key in each fraction entry
    metric: str  # the headline metric in words (axis label)
    source: str | None = None  # the results' task key when it differs from the plot's name
    sd_key: str = "sd"  # the spread over seeds in each fraction entry
    per_seed: bool = True  # whether the entry's ``per_seed`` values are of ``key``


#: plots of the tasks reported per label fraction, in report order
FRACTION_TASKS: dict[str, FractionTask] = {
    "linear_probe": FractionTask("linear probe", "mean", "mean AUROC"),
    "prompt_tuning": FractionTask("prompt tuning", "mean", "mean AUROC"),
    "finetune": FractionTask("full fine-tuning", "mean", "mean AUROC"),
    "segmentation": FractionTask("segmentation", "dice", "mean Dice"),
    "segmentation_large": FractionTask("segmentation, classes at least one patch large", "dice_large", "mean Dice",
                                       source="segmentation", sd_key="sd_large", per_seed=False),
    "detection": FractionTask("detection", "map_50", "mAP@0.5"),
}


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def fraction_points(metrics: Mapping[str, Any], task: str) -> list[tuple[float, float, float, int]]:
    """``(fraction, headline value, sd over seeds, number of seeds)`` per fraction of one model's
    ``task`` result, sorted by fraction; fractions without a finite value are left out.

    The sd is recomputed from ``per_seed`` (ddof=1) when the entry has two or more seed values,
    else taken from ``sd`` (0 when absent); the seed count comes from ``per_seed`` or the
    result's ``seeds`` list.
    """
    spec = FRACTION_TASKS[task]
    result = metrics.get(spec.source or task) or {}
    n_seeds = len(result.get("seeds") or []) or 1
    points = []
    for key, entry in (result.get("fractions") or {}).items():
        value = _finite((entry or {}).get(spec.key))
        frac = _finite(entry.get("fraction", key)) if value is not None else None
        if value is None or frac is None or frac <= 0:
            continue
        seeds = [v for v in (_finite(s) for s in entry.get("per_seed") or []) if v is not None] if spec.per_seed else []
        if len(seeds) > 1:
            sd, n = float(np.std(seeds, ddof=1)), len(seeds)
        else:
            sd, n = _finite(entry.get(spec.sd_key)) or 0.0, max(len(seeds), n_seeds)
        points.append((frac, value, sd, n))
    return sorted(points)


def _tick_label(fraction: float) -> str:
    return f"{fraction * 100:g} %"


def plot_label_efficiency(results: Mapping[str, Mapping[str, Any]], out_dir: str | Path,
                          prefix: str = "") -> list[Path]:
    """One ``<prefix>label_efficiency_<task>.png`` per plot of :data:`FRACTION_TASKS` that any
    model has results for, in ``out_dir``; returns their paths in :data:`FRACTION_TASKS` order
    (empty when no model has fraction results)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    paths: list[Path] = []
    for task, spec in FRACTION_TASKS.items():
        lines = {name: fraction_points(m, task) for name, m in results.items()}
        lines = {name: pts for name, pts in lines.items() if pts}
        if not lines:
            continue
        fig = Figure(figsize=(5.0, 3.6))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        fractions = sorted({p[0] for pts in lines.values() for p in pts})
        max_seeds = max(p[3] for pts in lines.values() for p in pts)
        for name, pts in lines.items():
            x, y, sd, _ = (np.asarray(col, dtype=np.float64) for col in zip(*pts))
            # error bars only where there is a spread to show (one seed: the bare line)
            ax.errorbar(x, y, yerr=sd if np.any(sd > 0) else None, marker="o", capsize=3, label=name)
        ax.set_xscale("log")
        ax.set_xticks(fractions)
        ax.set_xticklabels([_tick_label(f) for f in fractions])
        ax.minorticks_off()  # log-axis minor ticks would add unlabeled clutter between 1 %, 10 %, 100 %
        if len(fractions) == 1:  # a single point: widen the axis so the tick is not at the edge
            ax.set_xlim(fractions[0] / 3, fractions[0] * 3)
        spread = f"error bars: sd over {max_seeds} seeds" if max_seeds > 1 else "one seed, no error bars"
        ax.set_title(f"{spec.title}: {spec.metric} vs label fraction\n({spread})", fontsize=9)
        ax.set_xlabel("label fraction of the training split")
        ax.set_ylabel(spec.metric)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{prefix}label_efficiency_{task}.png"
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths


__all__ = ["FRACTION_TASKS", "FractionTask", "fraction_points", "plot_label_efficiency"]
