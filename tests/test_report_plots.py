"""Label-efficiency plots and the one-command suite: PNGs per fraction task, their embedding in
report.md, the side-by-side rows of every task, and ``medvlp evaluate --tasks all``."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medvlp.cli import build_parser, expand_tasks, main
from medvlp.errors import ConfigError
from medvlp.eval.plots import FRACTION_TASKS, fraction_points, plot_label_efficiency
from medvlp.eval.report import format_table, write_report
from medvlp.eval.runner import TASKS
from tests.conftest import TINY

FRACS = ("0.01", "0.1", "1")


def _auroc_task(base: float, per_seed_spread: float) -> dict:
    """Shaped like linear_probe / finetune / prompt_tuning results (mean, sd, per_seed per fraction)."""
    out = {"seeds": [0, 1, 2], "fractions": {}}
    for i, key in enumerate(FRACS):
        seeds = [base + 0.1 * i + d for d in (-per_seed_spread, 0.0, per_seed_spread)]
        out["fractions"][key] = {"fraction": float(key), "mean": float(np.mean(seeds)),
                                 "sd": float(np.std(seeds, ddof=1)), "per_seed": seeds, "per_class": {},
                                 "n_train": [10 * (i + 1)] * 3, "degenerate_classes": []}
    return out


def _dense_task(key: str, base: float) -> dict:
    """Shaped like segmentation (``dice``) / detection (``map_50`` + ``map_50_95``) results."""
    fractions = {}
    for i, fk in enumerate(FRACS):
        entry = {key: base + 0.1 * i, "sd": 0.02, "per_class": {}, "n_train": [5, 5]}
        if key == "map_50":
            entry.update(map_50_95=base / 2 + 0.05 * i, map_50_95_sd=0.01, per_class_50_95={})
        else:
            entry.update(dice_large=base + 0.2 + 0.1 * i, sd_large=0.04)
        fractions[fk] = entry
    extra = {"unscored_test_only": ["Fracture"]} if key == "map_50" else {"large_classes": ["Cardiomegaly"]}
    return {"fractions": fractions, "classes": ["Nodule"], "seeds": [0, 1], **extra}


def _vqa() -> dict:
    acc = {k: {"mean": 0.5, "sd": 0.0, "per_seed": [0.5]} for k in ("closed", "open", "overall")}
    return {"seeds": [0], "model": {**acc, "per_kind": {}}, "question_only": {**acc, "per_kind": {}},
            "image_shuffled": {**acc, "per_kind": {}}}


def _suite_results() -> dict:
    loc = {"mean": 0.4, "per_class": {}}
    full = {
        "meta": {"n_test": 10},
        "retrieval": {d: {f"R@{k}": 0.1 * k for k in (1, 5, 10)} for d in ("image_to_text", "text_to_image")},
        "linear_probe": _auroc_task(0.6, 0.03),
        "prompt_tuning": _auroc_task(0.55, 0.01),
        "finetune": _auroc_task(0.65, 0.02),
        "segmentation": _dense_task("dice", 0.3),
        "detection": _dense_task("map_50", 0.2),
        "vqa": _vqa(),
        "localization": {"pointing_game": loc, "iou_topk": loc, "chance": {"pointing_game": loc, "iou_topk": loc}},
    }
    image_only = {"meta": {"n_test": 10, "skipped_tasks": {"zeroshot": "image-only model (no text encoder)",
                                                           "prompt_tuning": "the model has no learned prompts"}},
                  "linear_probe": _auroc_task(0.5, 0.0), "segmentation": _dense_task("dice", 0.2)}
    return {"clip": full, "mae": image_only}


def test_fraction_points_reads_headline_metric_and_seed_spread():
    results = _suite_results()
    points = fraction_points(results["clip"], "linear_probe")
    assert [p[0] for p in points] == [0.01, 0.1, 1.0]
    assert points[0][1] == pytest.approx(0.6) and points[0][2] == pytest.approx(0.03) and points[0][3] == 3
    seg = fraction_points(results["clip"], "segmentation")
    assert [p[1] for p in seg] == pytest.approx([0.3, 0.4, 0.5]) and seg[0][2] == pytest.approx(0.02)
    assert [p[1] for p in fraction_points(results["clip"], "detection")] == pytest.approx([0.2, 0.3, 0.4])
    assert fraction_points(results["mae"], "detection") == []
    results["clip"]["finetune"]["fractions"]["0.1"]["mean"] = None  # undefined point: left out
    assert [p[0] for p in fraction_points(results["clip"], "finetune")] == [0.01, 1.0]


def test_one_valid_png_per_fraction_task(tmp_path):
    paths = plot_label_efficiency(_suite_results(), tmp_path)
    assert [p.name for p in paths] == [f"label_efficiency_{t}.png" for t in FRACTION_TASKS]
    for path in paths:
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] > 200 and img.size[1] > 150
            pixels = np.asarray(img.convert("L"))
        assert pixels.std() > 5  # something is drawn, not a blank canvas


def test_only_tasks_present_are_plotted(tmp_path):
    results = {"a": {"segmentation": _dense_task("dice", 0.3)}, "b": {"detection": {"fractions": {}}}}
    paths = plot_label_efficiency(results, tmp_path)
    assert [p.name for p in paths] == ["label_efficiency_segmentation.png", "label_efficiency_segmentation_large.png"]
    # the large-class curve reads dice_large and its own sd (sd_large), not the all-class per-seed values
    large = fraction_points(results["a"], "segmentation_large")
    assert [p[1] for p in large] == pytest.approx([0.5, 0.6, 0.7]) and {p[2] for p in large} == {0.04}
    (tmp_path / "x").mkdir()
    named = plot_label_efficiency(results, tmp_path / "x", prefix="grid_")
    assert [p.name for p in named] == ["grid_label_efficiency_segmentation.png",
                                       "grid_label_efficiency_segmentation_large.png"]


def test_no_fraction_tasks_no_plot_and_no_section(tmp_path):
    results = {"m": {"retrieval": {d: {f"R@{k}": 0.5 for k in (1, 5, 10)} for d in ("image_to_text", "text_to_image")}}}
    assert plot_label_efficiency(results, tmp_path) == []
    write_report(results, tmp_path / "rep")
    assert not list((tmp_path / "rep").glob("label_efficiency_*.png"))
    assert "Label efficiency" not in (tmp_path / "rep" / "report.md").read_text()


def test_report_embeds_plots_and_has_a_row_per_task(tmp_path):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "label_efficiency_vqa.png").write_bytes(b"stale")  # a previous report's file is removed
    results = _suite_results()
    write_report(results, out)
    report = (out / "report.md").read_text()
    section = report.split("## Label efficiency", 1)[1]
    for task in FRACTION_TASKS:
        name = f"label_efficiency_{task}.png"
        assert f"]({name})" in section and (out / name).is_file()
    assert not (out / "label_efficiency_vqa.png").exists()
    table = format_table(results)
    for row in ("image→text R@1", "text→image R@10", "linear probe AUROC @1%", "prompt tuning AUROC @100%",
                "fine-tuning AUROC @10%", "segmentation Dice @1%", "detection mAP@0.5 @100%",
                "detection mAP@[.5:.95] @10%", "VQA overall accuracy (question-only / image-shuffled)",
                "VQA closed accuracy", "VQA open accuracy", "localisation: pointing game (chance)"):
        assert row in table, row
    assert "0.300 ± 0.020" in table  # segmentation Dice @1 % with its sd over seeds
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()}
    assert rows["segmentation Dice, large classes @1%"].split(" | ")[1] == "0.500 ± 0.040"
    assert "detection: classes with test boxes but no training box, not scored: Fracture" in report
    assert "segmentation: large classes (median mask at least one patch): Cardiomegaly" in report
    assert rows["prompt tuning AUROC @1%"].endswith("| skipped |")  # mae: skipped, said so in its cell
    assert rows["fine-tuning AUROC @1%"].endswith("|  |")  # mae: not run, not skipped: empty
    assert "mae: zeroshot skipped (image-only model (no text encoder))" in report
    assert "mae: prompt_tuning skipped" in report


def test_cli_tasks_all_expands_to_every_task():
    args = build_parser().parse_args(["evaluate", "ckpt", "--tasks", "all"])
    assert expand_tasks(args.tasks, args.all_tasks) == list(TASKS)
    args = build_parser().parse_args(["evaluate", "ckpt", "--all-tasks"])
    assert args.all_tasks and expand_tasks(args.tasks, args.all_tasks) == list(TASKS)
    assert expand_tasks("retrieval, zeroshot,retrieval") == ["retrieval", "zeroshot"]
    assert expand_tasks(None) is None
    with pytest.raises(ConfigError, match="unknown task.*zero_shot"):
        expand_tasks("zero_shot")


def test_evaluate_all_tasks_end_to_end(tmp_path, tiny_dataset):
    run, run2 = tmp_path / "run", tmp_path / "run2"
    for folder, seed in ((run, 0), (run2, 1)):
        assert main(["pretrain", "--config", "configs/experiments/demo.yaml", *TINY, f"data.manifest={tiny_dataset}",
                     f"train.output_dir={folder}", "train.steps=2", f"train.seed={seed}"]) == 0
    out = tmp_path / "eval"
    # one label fraction keeps this test fast (the fraction protocol is covered above and in the task tests);
    # two checkpoints in one command: one report, side by side
    assert main(["evaluate", str(run), str(run2), "--tasks", "all", "--out", str(out),
                 "--overrides", "eval.fractions=[1.0]"]) == 0
    both = json.loads((out / "metrics.json").read_text())
    assert set(both) == {"run", "run2"}
    assert both["run"]["zeroshot"]["mean"] != both["run2"]["zeroshot"]["mean"]  # two different models
    table = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert table[0] == "| metric | run | run2 |" and len(table) > 8
    assert all(line.count("|") == 4 for line in table)  # every metric row has a cell per checkpoint
    metrics = both["run"]
    skipped = metrics["meta"].get("skipped_tasks") or {}
    for task in TASKS:  # every task either ran or is listed with the reason it did not apply
        assert task in metrics or task in skipped, task
    assert "prompt_tuning" in skipped  # CLIP has no learned prompts
    seconds = metrics["meta"]["seconds"]  # where evaluation time goes, per task that trains something
    assert {"linear_probe", "vqa", "segmentation", "detection", "finetune"} <= set(seconds)
    assert all(v >= 0 for v in seconds.values())
    report = (out / "report.md").read_text()
    assert "run: prompt_tuning skipped" in report and "## Label efficiency" in report
    for task, spec in FRACTION_TASKS.items():
        if (spec.source or task) in metrics:
            assert (out / f"label_efficiency_{task}.png").is_file()
