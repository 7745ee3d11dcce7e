"""The ``medvlp`` command line: synth, pretrain, evaluate, demo, list.

Every subcommand has ``--help``. Config-driven subcommands take ``--config FILE`` and
any number of ``section.key=value`` overrides. User errors (bad config values, missing
files) print one readable message and exit non-zero (2 for configuration errors)
instead of a traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medvlp.errors import MedvlpError

EPILOG_OVERRIDES = "Overrides: any number of dotted key=value pairs, e.g. train.steps=200 data.batch_size=32"


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="generate the synthetic chest-radiograph dataset (SynthCXR)",
                       description="Generate synthetic chest radiographs with known findings, templated reports, "
                                   "CheXpert-style labels and subject-level splits, as PNG files + manifest.jsonl.")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--preset", choices=["small", "standard", "large"], default=None,
                   help="benchmark size: small (smoke set, seconds), standard (the frozen benchmark, minutes), "
                        "large (100k+ images); explicit size flags override it")
    p.add_argument("--subjects", type=int, default=None, help="number of synthetic subjects (default 200, or the preset's)")
    p.add_argument("--studies", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="studies per subject, inclusive range (default 1 4, or the preset's)")
    p.add_argument("--image-size", type=int, default=None, help="image side in pixels (default 64, or the preset's)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    p.add_argument("--workers", type=int, default=0, help="parallel rendering processes (default 0 = one per core)")
    p.add_argument("--shards", action="store_true", help="also write webdataset-style tar shards under OUT/shards")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--no-masks", action="store_true", help="do not write the per-finding mask images")
    p.add_argument("--real-reports", default=None, metavar="SOURCE",
                   help="also render the real IU chest X-ray reports as extra subjects: 'iu' (the torchxrayvision "
                        "wheel in the cache, downloaded if absent) or a wheel / NLMCXR_reports.tgz path")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="pre-train a method from a YAML config", epilog=EPILOG_OVERRIDES,
                       description="Pre-train the method named in the config. Run under torchrun for several processes.")
    p.add_argument("--config", required=True, help="experiment or method YAML (e.g. configs/experiments/demo.yaml)")
    p.add_argument("--resume", action="store_true", help="continue exactly from the run folder's latest checkpoint")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate checkpoints side by side (one task, several, or --tasks all)",
                       epilog=EPILOG_OVERRIDES,
                       description="Evaluate one or more checkpoints (checkpoint or run folders) on a dataset's test split "
                                   "and write metrics.json, report.md, roc.png and label-efficiency plots.")
    p.add_argument("checkpoints", nargs="+", help="checkpoint folders or run folders (latest checkpoint)")
    p.add_argument("--data", default=None, help="dataset folder or manifest (default: the one the first model trained on)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated subset of zeroshot,retrieval,retrieval_itm,linear_probe,localization,"
                        "prompt_tuning,vqa,finetune,segmentation,detection, or 'all' (the whole suite; tasks that "
                        "do not apply to a model are skipped and listed in the report)")
    p.add_argument("--all-tasks", action="store_true", help="run the whole suite (same as --tasks all)")
    p.add_argument("--out", default=None, help="report folder (default: <first checkpoint>/eval)")
    p.add_argument("--random-init", action="store_true",
                   help="also evaluate the first model's encoders at random initialisation, as a baseline")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overrides", nargs="*", default=[], help="eval.* overrides, e.g. eval.probe_seeds=5")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="synthesise data, pre-train CLIP, evaluate against random init (CPU, < 10 min)",
                       epilog=EPILOG_OVERRIDES)
    p.add_argument("--out", default="medvlp-demo", help="working folder (default ./medvlp-demo)")
    p.add_argument("--config", default=None, help="experiment YAML (default: the packaged demo config)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and of training (default 0)")
    p.add_argument("--subjects", type=int, default=None, help="synthetic subjects (default: the demo's size)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")


def _add_list(sub) -> None:
    p = sub.add_parser("list", help="list registered methods, encoders and datasets")
    p.add_argument("what", nargs="?", choices=["methods", "encoders", "datasets", "preparers", "all"], default="all")


def _add_prepare(sub) -> None:
    from medvlp.data.prepare import PREPARERS

    p = sub.add_parser("prepare", help="prepare a real dataset once: resized images in tar shards + manifest",
                       description="Read a downloaded dataset, resize every image once, write tar shards, manifest.jsonl, "
                                   "dataset.json and quarantine.jsonl. Resumable: rerun the same command after an "
                                   "interruption. See docs/data/prepare.md.")
    p.add_argument("--list", action="store_true", help="list the available preparers and exit")
    datasets = p.add_subparsers(dest="dataset", metavar="DATASET")
    for name in PREPARERS:
        cls = PREPARERS.get(name)
        q = datasets.add_parser(name, help=cls.description, description=cls.description)
        q.add_argument("--root", required=True, help="the downloaded dataset folder")
        q.add_argument("--out", required=True, help="output folder (created; rerun into it to resume)")
        q.add_argument("--image-size", type=int, default=512, help="longest image side after resizing (default 512)")
        q.add_argument("--workers", type=int, default=0, help="parallel processes (default 0 = one per core)")
        q.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
        q.add_argument("--bit-depth", choices=["auto", "8"], default="auto",
                       help="auto: 16-bit PNG for >8-bit sources (DICOM), else 8-bit (default); 8: always 8-bit")
        q.add_argument("--subject-key", default=None,
                       help="secret key of the subject hash for DICOM without dataset ids "
                            "(prefer the MEDVLP_SUBJECT_KEY environment variable: flags end up in shell history)")
        q.add_argument("--no-progress", action="store_true", help="hide the progress bar")
        cls.add_arguments(q)


def build_parser() -> argparse.ArgumentParser:
    from medvlp import __version__

    parser = argparse.ArgumentParser(prog="medvlp", description="Medical vision-language pre-training.")
    parser.add_argument("--version", action="version", version=f"medvlp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_synth, _add_pretrain, _add_evaluate, _add_demo, _add_list, _add_prepare):
        add(sub)
    return parser


# --------------------------------------------------------------------------- commands


def cmd_synth(args) -> int:
    from medvlp.data.synth import generate

    path = generate(args.out, preset=args.preset, subjects=args.subjects,
                    studies_per_subject=tuple(args.studies) if args.studies else None, image_size=args.image_size,
                    seed=args.seed, workers=args.workers, shards=args.shards, shard_size=args.shard_size,
                    masks=not args.no_masks, progress=not args.no_progress, real_reports=args.real_reports)
    from medvlp.data.manifest import read_info

    info = read_info(path)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(info["split_counts"].items()))
    print(f"wrote {path}: {sum(info['split_counts'].values())} images ({counts})")
    print(f"benchmark: {info.get('benchmark') or 'none (not a frozen preset)'}; generator {info['version']}, "
          f"manifest sha256 {info['manifest_sha256'][:12]}")
    return 0


def cmd_pretrain(args) -> int:
    from medvlp.config import load_config
    from medvlp.train.loop import pretrain

    cfg = load_config(args.config, args.overrides)
    path = pretrain(cfg, resume=args.resume, device=args.device)
    print(f"checkpoint: {path}")
    return 0


def expand_tasks(tasks: str | None, all_tasks: bool = False) -> list[str] | None:
    """``--tasks`` / ``--all-tasks`` -> the task list (None: keep the config's ``eval.tasks``).

    ``all`` (alone or in the list) and ``--all-tasks`` expand to every task of
    :data:`medvlp.eval.runner.TASKS`, in the runner's order.
    """
    from medvlp.errors import ConfigError
    from medvlp.eval.runner import TASKS

    names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if all_tasks or "all" in names:
        return list(TASKS)
    if not names:
        return None
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ConfigError(f"--tasks: unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)} or 'all'")
    return list(dict.fromkeys(names))


# Fields the evaluation takes from the first checkpoint's config and applies to every compared model:
# image preprocessing, the patch grid (segmentation / detection) and the text length (prompts, VQA).
SHARED_EVAL_FIELDS = ("model.vision.image_size", "model.vision.patch_size", "model.vision.in_chans",
                      "model.text.max_length", "data.mean", "data.std", "data.pad_to_square", "data.sections")


def check_comparable(bundles) -> None:
    """Raise a ConfigError when checkpoints evaluated side by side disagree on a field the evaluation
    applies to all of them (:data:`SHARED_EVAL_FIELDS`): one model would be fed data it was not
    trained on, silently."""
    from medvlp.config import to_dict
    from medvlp.errors import ConfigError

    def get(raw: dict, dotted: str):
        for part in dotted.split("."):
            raw = raw.get(part) if isinstance(raw, dict) else None
        return raw

    ref = to_dict(bundles[0].cfg)
    for b in bundles[1:]:
        raw = to_dict(b.cfg)
        for key in SHARED_EVAL_FIELDS:
            if get(raw, key) != get(ref, key):
                raise ConfigError(f"{key}: {bundles[0].path} has {get(ref, key)!r} but {b.path} has {get(raw, key)!r}; "
                                  "checkpoints compared in one `medvlp evaluate` call are fed the same images and "
                                  "reports, so evaluate them separately (one --out each) and compare the metrics.json "
                                  "files, or retrain with matching settings")


def cmd_evaluate(args) -> int:
    from medvlp.config import apply_overrides, build_config, to_dict
    from medvlp.eval.report import format_table
    from medvlp.eval.runner import evaluate_models
    from medvlp.hub import load_bundle

    bundles = [load_bundle(p, device=args.device) for p in args.checkpoints]
    check_comparable(bundles)
    first = bundles[0]
    raw = to_dict(first.cfg)
    overrides = list(args.overrides)
    tasks = expand_tasks(args.tasks, args.all_tasks)
    if tasks:
        overrides.append(f"eval.tasks=[{','.join(tasks)}]")
    cfg = build_config(apply_overrides(raw, overrides))
    data = args.data or cfg.data.manifest
    models = {}
    for b in bundles:
        name = b.path.parent.parent.name if b.path.parent.name == "checkpoints" else b.path.name
        models[name] = (b.method, b.tokenizer)
    if args.random_init:
        base = load_bundle(args.checkpoints[0], device=args.device, weights=False)
        models["random-init"] = (base.method, base.tokenizer)
    subjects = set().union(*(b.pretrain_subject_hashes for b in bundles))
    out = Path(args.out) if args.out else first.path / "eval"
    images = set().union(*(b.pretrain_image_hashes for b in bundles))
    results = evaluate_models(models, cfg, data, out, pretrain_subjects=subjects, pretrain_images=images,
                              device=args.device)
    print(format_table(results))
    print(f"report: {out / 'report.md'}")
    return 0


def cmd_demo(args) -> int:
    from medvlp.demo import run_demo

    from medvlp.demo import DEMO_SUBJECTS

    run_demo(args.out, config=args.config, overrides=args.overrides, seed=args.seed,
             subjects=args.subjects or DEMO_SUBJECTS)
    return 0


def cmd_list(args) -> int:
    from medvlp.data.prepare import PREPARERS
    from medvlp.registry import DATASETS, ENCODERS, METHODS

    groups = {"methods": METHODS, "encoders": ENCODERS, "datasets": DATASETS, "preparers": PREPARERS}
    for name, reg in groups.items():
        if args.what not in (name, "all"):
            continue
        print(f"{name}:")
        for key, desc in reg.describe().items():
            print(f"  {key:<14} {desc}")
    return 0


def cmd_prepare(args) -> int:
    import os

    from medvlp.data.prepare import PREPARERS, prepare
    from medvlp.errors import ConfigError

    if args.list or not args.dataset:
        if not args.list:
            raise ConfigError("prepare: name a dataset, e.g. `medvlp prepare mimic-cxr --root RAW --out DIR`; "
                              "available: " + ", ".join(PREPARERS))
        for name, desc in PREPARERS.describe().items():
            print(f"  {name:<14} {desc}")
        return 0
    cls = PREPARERS.get(args.dataset)
    workers = args.workers if args.workers > 0 else (os.cpu_count() or 1)
    result = prepare(cls(args.root, **cls.options_from_args(args)), None, args.out, image_size=args.image_size,
                     workers=workers, shard_size=args.shard_size, key=args.subject_key,
                     progress=not args.no_progress, bit_depth=args.bit_depth)
    print(f"wrote {result.out}: {result.rows} images, {result.quarantined} quarantined "
          f"({', '.join(f'{k} {v}' for k, v in sorted(result.quarantine_reasons.items())) or 'none'}); "
          f"{result.processed} read in {result.seconds:.1f} s ({result.images_per_second:.1f} images/s), "
          f"{result.resumed_chunks} chunk(s) resumed")
    return 0


COMMANDS = {"prepare": cmd_prepare, "synth": cmd_synth, "pretrain": cmd_pretrain, "evaluate": cmd_evaluate, "demo": cmd_demo, "list": cmd_list}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except MedvlpError as exc:
        print(f"medvlp {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; resume with --resume where the command supports it", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
