"""``medvlp demo``: synthesise data, pre-train CLIP, evaluate it against the same encoders
at random initialisation, print the table and where the report is.

Sized to finish within 10 minutes on a 2-core CPU. Every step is also available as its
own command (``medvlp synth``, ``medvlp pretrain``, ``medvlp evaluate``); the demo prints
the equivalent commands so a user can rerun or vary any step.
"""
from __future__ import annotations

import shutil
import time
from importlib import resources
from pathlib import Path

DEMO_SUBJECTS = 1000
DEMO_SEED = 0


def packaged_config(relative: str) -> Path:
    """Path of a YAML file shipped inside the package (``medvlp/configs/...``)."""
    return Path(str(resources.files("medvlp") / "configs" / relative))


def run_demo(out: str | Path, *, config: str | None = None, overrides: list[str] | None = None,
             subjects: int = DEMO_SUBJECTS, seed: int = DEMO_SEED, progress: bool = True) -> dict:
    """Run the three steps in ``out``; returns ``{model name: metrics}`` plus ``"timing"``
    (seconds per step). ``seed`` seeds both the synthetic data and the training run."""
    from medvlp.config import load_config
    from medvlp.data.synth import generate
    from medvlp.eval.report import format_table
    from medvlp.eval.runner import evaluate_models
    from medvlp.hub import load_bundle
    from medvlp.train.loop import pretrain

    out = Path(out)
    t0 = time.perf_counter()
    data_dir = out / "synthcxr"
    config_path = Path(config) if config else packaged_config("experiments/demo.yaml")
    cfg = load_config(config_path, [f"data.manifest={data_dir}", f"train.output_dir={out / 'run'}",
                                    f"train.seed={seed}", f"train.progress={str(progress).lower()}", *(overrides or [])])
    timing: dict[str, float] = {}

    print(f"[1/3] synthesising {subjects} subjects -> {data_dir}")
    print(f"      (same as: medvlp synth --out {data_dir} --subjects {subjects} "
          f"--image-size {cfg.model.vision.image_size} --seed {seed})")
    generate(data_dir, subjects=subjects, image_size=cfg.model.vision.image_size, seed=seed, progress=progress)
    timing["synth_s"] = time.perf_counter() - t0

    print(f"[2/3] pre-training CLIP for {cfg.train.steps} steps -> {out / 'run'}")
    print(f"      (same as: medvlp pretrain --config {config_path} data.manifest={data_dir} train.output_dir={out / 'run'})")
    run_dir = out / "run"
    if run_dir.exists():  # the demo owns its working folder: a rerun starts afresh
        print(f"      removing the previous demo run in {run_dir}")
        shutil.rmtree(run_dir)
    t1 = time.perf_counter()
    ckpt = pretrain(cfg)
    timing["pretrain_s"] = time.perf_counter() - t1

    print("[3/3] evaluating the pre-trained model and the same encoders at random initialisation")
    trained = load_bundle(ckpt)
    baseline = load_bundle(ckpt, weights=False)
    report_dir = out / "eval"
    t2 = time.perf_counter()
    results = evaluate_models(
        {"clip": (trained.method, trained.tokenizer), "random-init": (baseline.method, baseline.tokenizer)},
        trained.cfg, data_dir, report_dir, pretrain_subjects=trained.pretrain_subject_hashes,
        pretrain_images=trained.pretrain_image_hashes, progress=progress,
    )
    timing["evaluate_s"] = time.perf_counter() - t2
    print()
    print(format_table(results))
    print(f"\nreport: {report_dir / 'report.md'}  (plots: {report_dir / 'roc.png'})")
    timing["total_s"] = time.perf_counter() - t0
    print(f"demo finished in {timing['total_s']:.0f} s")
    return {**results, "timing": timing}
