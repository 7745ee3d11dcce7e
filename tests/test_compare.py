"""The comparison runner (benchmarks/compare.py): a 2-recipe x 2-seed grid on the tiny
dataset, skipping finished runs, resuming an interrupted one, the wall-time cap, and the
refusal to mix benchmark versions."""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from medvlp import bench
from medvlp.bench import aggregate, dataset_version, stats
from medvlp.errors import ConfigError
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def _load_compare():
    spec = importlib.util.spec_from_file_location("medvlp_bench_compare", ROOT / "benchmarks" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


compare = _load_compare()


def _argv(dataset, out: Path, *extra: str, recipes="clip,supervised", seeds="0,1", steps=3) -> list[str]:
    splits = json.loads((Path(dataset) / "dataset.json").read_text()).get("split_counts", {})
    clip_split = "pretrain" if "pretrain" in splits else "train"  # SynthCXR's paired pre-training split when it has one
    sets = [a for item in TINY if not item.startswith(("data.batch_size", "train.steps")) for a in ("--set", item)]
    return ["--name", "tiny", "--dataset", str(dataset), "--recipes", recipes, "--seeds", seeds, "--steps", str(steps),
            "--batch-size", "4", "--out", str(out), "--results-dir", str(out / "results"), *sets,
            "--set", "train.save_every=1", "--set", f"data.train_split={clip_split}",
            "--recipe-set", "supervised:data.train_split=train", *extra]


@pytest.fixture(scope="module")
def grid(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    data = compare.run(_argv(tiny_dataset, out))
    return out, data


def _results(out: Path) -> dict[str, Path]:
    return {p.parent.name: p for p in sorted((out / "runs").glob("*/result.json"))}


def test_grid_writes_runs_and_aggregate(grid, tiny_dataset):
    out, _ = grid
    results = _results(out)
    assert set(results) == {"clip-seed0", "clip-seed1", "supervised-seed0", "supervised-seed1"}
    manifest_sha = hashlib.sha256((Path(tiny_dataset) / "manifest.jsonl").read_bytes()).hexdigest()
    for name, path in results.items():
        r = json.loads(path.read_text())
        assert r["benchmark"]["data"]["manifest_sha256"] == manifest_sha
        assert r["benchmark"]["data"]["generator_version"] == dataset_version(tiny_dataset)["generator_version"]
        assert r["budget"]["steps_done"] == 3 and r["budget"]["samples_seen"] == 12 and not r["capped"]
        assert r["budget"]["flops_per_step"] > 0 and r["metrics"]["flops_total"] == 3 * r["budget"]["flops_per_step"]
        assert r["config"]["train"]["seed"] == int(name[-1])
        assert 0 <= r["metrics"]["probe_auroc@1"] <= 1
    sup = json.loads(results["supervised-seed0"].read_text())
    assert sup["train"]["data"] == "train" and 0 <= sup["metrics"]["head_auroc"] <= 1
    assert "zeroshot_auroc" not in sup["metrics"] and set(sup["evaluation"]["meta"]["skipped_tasks"]) == {"zeroshot", "retrieval"}
    clip = json.loads(results["clip-seed0"].read_text())
    assert {"zeroshot_auroc", "i2t_R@1", "t2i_R@10"} <= set(clip["metrics"])
    # the two recipes' FLOPs differ (CLIP also runs a text tower), seeds of one recipe do not
    assert clip["budget"]["flops_per_step"] > sup["budget"]["flops_per_step"]

    saved = json.loads((out / "results" / "tiny.json").read_text())
    assert saved["benchmark"] == clip["benchmark"] and saved["machine"]["torch"] and saved["date"]
    assert list(saved["recipes"]) == ["clip", "supervised"]
    assert saved["recipes"]["clip"]["machines"] == [bench.machine_label(clip["machine"])]
    assert saved["recipes"]["clip"]["metrics"]["steps"] == {"mean": 3.0, "sd": 0.0, "n": 2}
    seeds_auc = [json.loads(results[f"clip-seed{k}"].read_text())["metrics"]["zeroshot_auroc"] for k in (0, 1)]
    assert saved["recipes"]["clip"]["metrics"]["zeroshot_auroc"] == stats(seeds_auc)
    md = (out / "results" / "tiny.md").read_text()
    assert "python benchmarks/compare.py --name tiny" in md and "| supervised | 2 | train | CPU, " in md and " ± " in md
    # the code behind each row: the commit that first trained each cell, kept in the cell's folder
    head = clip["machine"]["git_commit"]
    assert clip["trained_at_commit"] == head == json.loads((out / "runs" / "clip-seed0" / "provenance.json").read_text())["git_commit"]
    assert saved["recipes"]["clip"]["commits"] == {"trained": [head[:10]], "evaluated": [head[:10]]}
    assert f"- clip: trained {head[:10]}; evaluated {head[:10]}" in md
    # label-efficiency curves of the grid: mean over seeds per recipe, embedded in the table's page
    assert "tiny_label_efficiency_linear_probe.png" in saved["plots"]
    for name in saved["plots"]:
        assert (out / "results" / name).stat().st_size > 1000 and f"]({name})" in md


def test_rerun_skips_finished_and_resumes_interrupted(grid, tiny_dataset):
    out, _ = grid
    before = {name: (p.stat().st_mtime_ns, p.read_text()) for name, p in _results(out).items()}
    logs = {name: (out / "runs" / name / "train" / "metrics.jsonl").read_text() for name in before}
    compare.run(_argv(tiny_dataset, out))
    assert {name: (p.stat().st_mtime_ns, p.read_text()) for name, p in _results(out).items()} == before
    assert {name: (out / "runs" / name / "train" / "metrics.jsonl").read_text() for name in before} == logs  # no training

    # interrupt clip-seed1 after its step-2 checkpoint: no result, no later checkpoint
    run = out / "runs" / "clip-seed1"
    (run / "result.json").unlink()
    ckpts = sorted((run / "train" / "checkpoints").iterdir())
    assert ckpts[-1].name == "step_00000003"
    shutil.rmtree(ckpts[-1])
    compare.run(_argv(tiny_dataset, out))
    resumed = json.loads((run / "result.json").read_text())
    assert resumed["resumed_from_step"] == 2 and resumed["budget"]["steps_done"] == 3
    steps_logged = [json.loads(line)["step"] for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == [1, 2, 3, 3]  # only step 3 was trained again
    for name in ("clip-seed0", "supervised-seed0", "supervised-seed1"):
        assert (out / "runs" / name / "result.json").stat().st_mtime_ns == before[name][0]


def test_wall_time_cap_stops_and_marks_capped(tiny_dataset, tmp_path):
    data = compare.run(_argv(tiny_dataset, tmp_path, "--max-minutes", "1e-5", recipes="supervised", seeds="0", steps=50))
    r = json.loads((tmp_path / "runs" / "supervised-seed0" / "result.json").read_text())
    assert r["capped"] and r["budget"]["steps_done"] < 50
    state = json.loads((Path(r["train"]["checkpoint"]) / "trainer_state.json").read_text())
    assert state["time_limited"] and state["step"] == r["budget"]["steps_done"]
    assert 0 <= r["metrics"]["head_auroc"] <= 1  # evaluated where it stopped
    assert data["recipes"]["supervised"]["capped_seeds"] == [0]
    assert "supervised (1 capped)" in (tmp_path / "results" / "tiny.md").read_text()


def test_mismatched_versions_refuse_to_aggregate(grid, tiny_dataset, capsys):
    out, _ = grid
    results = [json.loads(p.read_text()) for p in _results(out).values()]
    other = copy.deepcopy(results[0])
    other["benchmark"]["data"]["manifest_sha256"] = "0" * 64
    with pytest.raises(ConfigError, match="different benchmark versions"):
        aggregate([*results, other])
    # a finished run of another version in the out folder: the runner stops instead of mixing
    path = out / "runs" / "supervised-seed1" / "result.json"
    original = path.read_text()
    path.write_text(json.dumps(dict(json.loads(original), benchmark=other["benchmark"])))
    try:
        assert compare.main(_argv(tiny_dataset, out)) == 2
        assert "another benchmark version" in capsys.readouterr().err
    finally:
        path.write_text(original)


def test_runner_owned_keys_are_rejected(tiny_dataset, tmp_path, capsys):
    assert compare.main(_argv(tiny_dataset, tmp_path, "--set", "train.steps=5")) == 2
    assert "--steps" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_saved_configs_from_before_a_new_key_still_match(tiny_cfg):
    from medvlp.config import to_dict

    cfg = tiny_cfg()
    saved = to_dict(cfg)
    assert compare._same_config(copy.deepcopy(saved), cfg)
    older = copy.deepcopy(saved)
    del older["eval"]["prompt_tuning_steps"]  # a key added after the run: its default applies
    assert compare._same_config(older, cfg)
    changed = copy.deepcopy(saved)
    changed["train"]["lr"] = saved["train"]["lr"] * 2
    assert not compare._same_config(changed, cfg)
    capped_later = copy.deepcopy(saved)  # a wall-time cap or logging choice is not part of the cell
    capped_later["train"]["time_limit_minutes"] = 240.0
    capped_later["train"]["progress"] = not saved["train"]["progress"]
    capped_later["data"]["image_cache_mb"] = 512.0
    capped_later["train"]["threads"] = saved["train"]["threads"] + 3  # a run moved to a machine with more cores
    capped_later["data"]["num_workers"] = 3  # the PNG-folder stream's results do not depend on it
    assert compare._same_config(capped_later, cfg)
    gone = copy.deepcopy(saved)
    gone["method"]["no_such_key"] = 1  # a key that no longer exists: not the same run
    assert not compare._same_config(gone, cfg) and not compare._same_config(None, cfg)


def test_machine_label_names_the_gpu_or_the_cpu_cores():
    assert bench.machine_label({"gpu": "NVIDIA H200", "cores": 16}) == "NVIDIA H200"
    assert bench.machine_label({"gpu": None, "cores": 2}) == "CPU, 2 cores"
    assert bench.machine_label(None) == "?"


def test_vqa_parts_and_map_50_95_are_extracted():
    evaluation = {"vqa": {"model": {k: {"mean": v} for k, v in (("closed", 0.8), ("open", 0.6), ("overall", 0.7))},
                          "question_only": {"overall": {"mean": 0.5}}, "image_shuffled": {"overall": {"mean": 0.4}}},
                  "detection": {"fractions": {"1": {"map_50": 0.3, "map_50_95": 0.1}}}}
    m = bench.extract_metrics(evaluation)
    assert (m["vqa_closed"], m["vqa_open"], m["vqa_overall"], m["vqa_question_only"]) == (0.8, 0.6, 0.7, 0.5)
    assert (m["det_map50@1"], m["det_map50_95@1"]) == (0.3, 0.1)


def test_table_cells_show_spread_only_with_two_values_and_flag_missing_seeds():
    """One seed has no spread: its cell is the value alone, not "± 0.000"; a metric missing in some
    of a recipe's seeds says over how many seeds it is."""
    from medvlp.bench import _cell

    assert _cell(stats([0.7, 0.8]), "zeroshot_auroc", 2) == "0.750 ± 0.071"
    assert _cell(stats([0.7]), "zeroshot_auroc", 1) == "0.700"
    assert _cell(stats([0.7, None, 0.8]), "vqa_acc", 3) == "0.750 ± 0.071 (n=2)"
    assert _cell(stats([12.25]), "train_minutes", 1) == "12.2" and _cell(stats([3e13, 5e13]), "flops_total", 2) == "4e+13 ± 1.4e+13"
    assert _cell(stats([None]), "vqa_acc", 1) == "–"


def test_fraction_results_reshape_the_aggregate_for_the_plots():
    """Aggregated ``<metric>@<fraction>`` numbers become per-task fraction entries (mean and sd over
    seeds) that the label-efficiency plots read; metrics without fractions are left out."""
    from medvlp.bench import fraction_results
    from medvlp.eval.plots import fraction_points

    table = {"clip": {"seeds": [0, 1, 2], "metrics": {
        "probe_auroc@0.01": stats([0.70, 0.72, 0.74]), "probe_auroc@1": stats([0.80, 0.81, 0.82]),
        "seg_dice@0.01": stats([0.05, 0.07, 0.09]), "seg_dice_large@0.01": stats([0.1, 0.2, 0.3]),
        "det_map50@1": stats([0.2, 0.2, 0.2]), "zeroshot_auroc": stats([0.7, 0.7, 0.7]),
        "det_map50_95@1": stats([0.1, 0.1, 0.1])}}}
    res = fraction_results(table)["clip"]
    assert set(res) == {"linear_probe", "segmentation", "detection"}
    assert res["segmentation"]["fractions"]["0.01"] == pytest.approx({"dice": 0.07, "sd": 0.02, "dice_large": 0.2,
                                                                      "sd_large": 0.1})
    probe = fraction_points(res, "linear_probe")
    assert [(f, round(v, 3), round(sd, 3), n) for f, v, sd, n in probe] == [(0.01, 0.72, 0.02, 3), (1.0, 0.81, 0.01, 3)]
    assert fraction_points(res, "segmentation_large")[0][1:] == pytest.approx((0.2, 0.1, 3))


def test_combine_takes_rows_from_grids_of_one_benchmark(tmp_path, capsys):
    """benchmarks/combine.py puts recipes of several grids in one table (a recipe in two grids is
    labelled by grid) with its label-efficiency plots, and refuses grids of another budget."""
    spec = importlib.util.spec_from_file_location("medvlp_bench_combine", ROOT / "benchmarks" / "combine.py")
    combine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(combine)

    def grid(name, recipes, steps=1000):
        table = {r: {"seeds": [0, 1], "capped_seeds": [], "train": {"data": "pretrain"}, "machines": ["CPU, 2 cores"],
                     "metrics": {"probe_auroc@0.01": stats([base, base + 0.02]), "probe_auroc@1": stats([base + 0.1] * 2),
                                 "zeroshot_auroc": stats([base, base])}}
                 for r, base in recipes.items()}
        data = {"name": name, "command": "x", "date": "d", "machine": {"cpu": "c", "cores": 2, "gpu": None, "torch": "t"},
                "budget": {"steps": steps, "batch_size": 64, "max_minutes": 240}, "recipes": table,
                "benchmark": {"data": {"dataset": "synthcxr", "manifest_sha256": "ab" * 32}, "format": 1}}
        (tmp_path / f"{name}.json").write_text(json.dumps(data))

    grid("cpu", {"clip": 0.70, "slip": 0.72})
    grid("gpu", {"clip": 0.71, "mpma": 0.65})
    assert combine.main(["--name", "both", "--take", "cpu:clip,slip", "--take", "gpu:clip,mpma",
                         "--results-dir", str(tmp_path)]) == 0
    md = (tmp_path / "both.md").read_text()
    assert "| clip [cpu] | 2 |" in md and "| clip [gpu] | 2 |" in md and "| mpma | 2 |" in md
    assert "0.710 ± 0.014" in md  # slip's 1 % probe over its two seeds
    saved = json.loads((tmp_path / "both.json").read_text())
    assert saved["plots"] == ["both_label_efficiency_linear_probe.png"] and (tmp_path / saved["plots"][0]).is_file()
    grid("long", {"clip": 0.8}, steps=3000)
    assert combine.main(["--name", "bad", "--take", "cpu:clip", "--take", "long:clip", "--results-dir", str(tmp_path)]) == 2
    assert "--take long: budget" in capsys.readouterr().err and not (tmp_path / "bad.md").exists()
