"""Compare recipes under one fixed budget: a resumable grid of (recipe, seed) runs.

    python benchmarks/compare.py --name synthcxr-small --dataset data/synthcxr \\
        --config configs/experiments/demo.yaml --recipes clip,supervised,random-init --seeds 0,1,2 \\
        --steps 700 --batch-size 64 --recipe-set supervised:data.train_split=train

Every recipe gets the same budget (optimizer steps x batch size; FLOPs per step measured
once per recipe and reported as total FLOPs) and a wall-time cap per run (20 minutes by
default: a run that reaches it stops cleanly, is evaluated where it stopped and is marked
``capped``). A recipe is ``<recipes-dir>/<recipe>.yaml``; ``--config`` (an experiment YAML)
supplies what every recipe shares (its sections other than ``method`` override the
recipe's); ``--set`` overrides apply to all recipes, ``--recipe-set RECIPE:key=value`` to one.
``random-init`` is the ``clip`` recipe (with clip's ``--recipe-set`` overrides, then its own)
evaluated at its initialisation (no training). ``--max-minutes 0`` removes the cap.

Each finished run writes ``<out>/runs/<recipe>-seed<k>/result.json``; re-running the
command skips those and resumes interrupted runs from their latest checkpoint. The
aggregate (mean ± sd over seeds per recipe) goes to ``<results-dir>/<name>.json`` and
``.md``, with the command, machine, date and benchmark version (dataset generator version
+ manifest SHA-256); results of different versions are never aggregated together.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from medvlp.bench import (
    RESULT_FORMAT,
    aggregate,
    dataset_version,
    extract_metrics,
    first_batch,
    machine_info,
    plot_grid,
    render_markdown,
    step_flops,
    utc_now,
)
from medvlp.config import _deep_merge, apply_overrides, build_config, load_yaml, to_dict
from medvlp.errors import ConfigError, MedvlpError

HERE = Path(__file__).resolve().parent
RANDOM_INIT = "random-init"
RANDOM_INIT_BASE = "clip"  # the recipe whose initialisation random-init evaluates
#: keys the runner sets itself (the budget and the run layout); flags change them, --set may not
OWNED = ("data.manifest", "train.steps", "data.batch_size", "train.seed", "train.output_dir", "train.time_limit_minutes")


@dataclass
class Cell:
    recipe: str
    seed: int
    cfg: object
    dir: Path


def _split_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_recipe_sets(items: list[str], recipes: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {r: [] for r in recipes}
    for item in items:
        recipe, sep, override = item.partition(":")
        if not sep or "=" not in override:
            raise ConfigError(f"--recipe-set {item!r}: expected RECIPE:section.key=value, e.g. supervised:data.train_split=train")
        if recipe not in out:
            raise ConfigError(f"--recipe-set {item!r}: recipe {recipe!r} is not in --recipes ({', '.join(recipes)})")
        out[recipe].append(override)
    return out


def recipe_config(recipe: str, seed: int, args, recipe_sets: dict[str, list[str]], run_dir: Path):
    """The resolved config of one cell: recipe YAML < --config (minus method) < --set < --recipe-set < runner."""
    own = recipe_sets.get(recipe, [])
    if recipe == RANDOM_INIT:  # the same model as the clip runs it is the baseline of
        own = [*recipe_sets.get(RANDOM_INIT_BASE, []), *own]
    for item in [*args.set, *own]:
        if item.split("=", 1)[0].strip() in OWNED:
            raise ConfigError(f"override {item!r}: the runner sets {item.split('=', 1)[0]} itself; use --dataset, --steps, "
                              "--batch-size, --seeds, --out or --max-minutes")
    source = RANDOM_INIT_BASE if recipe == RANDOM_INIT else recipe
    path = Path(args.recipes_dir) / f"{source}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(args.recipes_dir).glob("*.yaml"))
        raise ConfigError(f"--recipes: no recipe file {path}; available: {', '.join(known + [RANDOM_INIT])}")
    raw = load_yaml(path)
    if args.config:
        shared = load_yaml(args.config)
        shared.pop("method", None)  # the recipe decides the method; the experiment what all recipes share
        raw = _deep_merge(raw, shared)
    owned = [f"data.manifest={args.dataset}", f"train.steps={args.steps}", f"data.batch_size={args.batch_size}",
             f"train.seed={seed}", f"train.output_dir={run_dir / 'train'}", f"train.time_limit_minutes={args.max_minutes}"]
    if args.tasks:
        owned.append(f"eval.tasks=[{args.tasks}]")
    raw = apply_overrides(raw, [*args.set, *own, *owned])
    raw["name"] = f"{args.name}-{recipe}-seed{seed}"
    return build_config(raw)


def trained_on(cfg, recipe: str) -> str:
    if recipe == RANDOM_INIT:
        return "none (initialisation)"
    if getattr(cfg.data, "sources", None):
        def part(s) -> str:
            subjects = "" if list(s.subjects) == [0.0, 1.0] else f", subjects [{s.subjects[0]:g}, {s.subjects[1]:g})"
            return f"{s.split} ({s.kind}, w {s.weight:g}{subjects})"

        return " + ".join(part(s) for s in cfg.data.sources)
    return cfg.data.train_split


def _paired_samples(cfg) -> list:
    from medvlp.data.mixed import read_sources

    return [s for src in read_sources(cfg) if src.kind == "paired" for s in src.samples]


def _init_model(cfg):
    """The recipe's model at initialisation, built exactly as the loop's step 0 builds it."""
    from medvlp.data.sample import hash_subject
    from medvlp.hub import build_method
    from medvlp.train.loop import prepare_tokenizer

    samples = _paired_samples(cfg)
    tokenizer = prepare_tokenizer(cfg, samples, None)
    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg, tokenizer, load_text_weights=False)
    return method, tokenizer, {hash_subject(s.subject_id) for s in samples}


def measure_flops(cfg) -> int:
    """FLOPs of one optimizer step of this recipe on its first real batch."""
    from medvlp.data.manifest import read_info

    method, tokenizer, _ = _init_model(cfg)
    batch = first_batch(cfg, tokenizer, read_info(cfg.data.manifest).get("classes", []))
    return step_flops(method, batch, cfg.train.accum_steps)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _same_config(saved: dict | None, cfg) -> bool:
    """Whether a finished run's saved config is this cell's. The saved one is read back through
    today's config classes first, so keys added to medvlp since (with their defaults) do not
    make an old run look different; a key that no longer exists does."""
    if saved is None:
        return False
    try:
        return _identity(to_dict(build_config(saved))) == _identity(to_dict(cfg))
    except ConfigError:
        return False


# Keys that change neither what a run computes nor its budget: the wall-time cap (a run that hit it
# is flagged ``capped``), logging, progress bars, checkpoint cadence, the CPU thread count (it changes
# only the order of floating-point sums) and the in-RAM image cache. A run finished under one setting
# of these is the same cell under another.
RUN_ONLY_KEYS = {"train": ("time_limit_minutes", "progress", "log_every", "tensorboard", "save_every", "keep_checkpoints",
                           "threads"),
                 "data": ("image_cache_mb",)}


def _identity(cfg: dict) -> dict:
    out = {**cfg, **{section: {k: v for k, v in cfg.get(section, {}).items() if k not in keys}
                     for section, keys in RUN_ONLY_KEYS.items()}}
    if not out["data"].get("shards"):  # the PNG-folder stream's results do not depend on the worker count
        out["data"].pop("num_workers", None)
    return out


def finished_result(cell: Cell, benchmark: dict) -> dict | None:
    """The cell's result if it already finished with this benchmark version and config."""
    path = cell.dir / "result.json"
    if not path.is_file():
        return None
    old = json.loads(path.read_text())
    if old.get("benchmark") != benchmark or not _same_config(old.get("config"), cell.cfg):
        what = "benchmark version (data or runner format)" if old.get("benchmark") != benchmark else "config or budget"
        raise ConfigError(f"{path} was made with another {what} than this command's. Fix: use another --out "
                          "folder, or delete that run folder to redo it")
    return old


def run_cell(cell: Cell, benchmark: dict, flops_per_step: int, args) -> dict:
    """Train (or resume) and evaluate one cell; write and return its result."""
    # every module the evaluation uses is imported now, before training: the runner imports the
    # dense tasks lazily, and a source edit during a long training run must not make the
    # evaluation mix two versions of the code (it did once: an ImportError after 60 minutes)
    import medvlp.eval.detection
    import medvlp.eval.finetune
    import medvlp.eval.segmentation
    import medvlp.eval.vqa  # noqa: F401
    from medvlp.eval.runner import evaluate_models
    from medvlp.hub import load_bundle
    from medvlp.train.checkpoint import latest_checkpoint
    from medvlp.train.loop import pretrain

    cfg, started = cell.cfg, utc_now()
    resumed_from = None
    # the code that first trained this cell (a resumed or re-evaluated cell keeps it); the result's
    # machine.git_commit is the code that evaluated it
    provenance_path = cell.dir / "provenance.json"
    if not provenance_path.is_file():
        here = machine_info()
        _write_json(provenance_path, {"first_started_at": started, "git_commit": here.get("git_commit"),
                                      "git_dirty": here.get("git_dirty")})
    provenance = json.loads(provenance_path.read_text())
    if cell.recipe == RANDOM_INIT:
        method, tokenizer, subjects = _init_model(cfg)
        images: set[str] = set()  # nothing was trained on
        state, checkpoint = {"step": 0, "train_seconds": 0.0, "time_limited": False}, None
    else:
        latest = latest_checkpoint(cell.dir / "train")
        if latest is not None:
            resumed_from = json.loads((latest / "trainer_state.json").read_text())["step"]
            print(f"  resuming {cell.dir.name} from step {resumed_from}")
        checkpoint = pretrain(cfg, resume=latest is not None, device=args.device)
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        bundle = load_bundle(checkpoint, device=args.device or "cpu")
        method, tokenizer, subjects = bundle.method, bundle.tokenizer, bundle.pretrain_subject_hashes
        images = bundle.pretrain_image_hashes
    t0 = time.perf_counter()
    eval_dir = cell.dir / "eval"
    evaluate_models({cell.recipe: (method, tokenizer)}, cfg, cfg.data.manifest, eval_dir, pretrain_subjects=subjects,
                    pretrain_images=images,
                    device=args.device or "cpu", progress=False)
    evaluation = json.loads((eval_dir / "metrics.json").read_text())[cell.recipe]  # NaN already made null
    eval_s = time.perf_counter() - t0
    steps = int(state["step"])
    samples = steps * cfg.data.batch_size * cfg.train.accum_steps
    budget = {"steps_planned": cfg.train.steps, "steps_done": steps, "batch_size": cfg.data.batch_size,
              "accum_steps": cfg.train.accum_steps, "samples_seen": samples, "flops_per_step": flops_per_step,
              "flops_total": flops_per_step * steps, "max_minutes": cfg.train.time_limit_minutes,
              "train_seconds": float(state.get("train_seconds", 0.0)), "eval_seconds": eval_s}
    metrics = {**extract_metrics(evaluation), "steps": steps, "samples_seen": samples,
               "flops_total": budget["flops_total"], "train_minutes": budget["train_seconds"] / 60}
    result = {
        "benchmark": benchmark, "name": args.name, "recipe": cell.recipe, "seed": cell.seed,
        "capped": bool(state.get("time_limited", False)), "resumed_from_step": resumed_from,
        "train": {"method": cfg.method.name, "data": trained_on(cfg, cell.recipe), "train_split": cfg.data.train_split,
                  "checkpoint": str(checkpoint) if checkpoint else None},
        "budget": budget, "metrics": metrics, "evaluation": evaluation, "config": to_dict(cfg),
        "command": args.command, "machine": machine_info(), "started_at": started, "finished_at": utc_now(),
        "trained_at_commit": provenance.get("git_commit"),
    }
    _write_json(cell.dir / "result.json", result)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="benchmark name: results go to <results-dir>/<name>.{json,md}")
    p.add_argument("--dataset", required=True, help="dataset folder (with manifest.jsonl and dataset.json)")
    p.add_argument("--recipes", default=f"clip,supervised,{RANDOM_INIT}", help="comma-separated recipe names")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (train.seed)")
    p.add_argument("--steps", type=int, default=700, help="optimizer steps per run (the same for every recipe)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per step (the same for every recipe)")
    p.add_argument("--config", default=None, help="experiment YAML whose non-method sections every recipe shares")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every recipe (repeat)")
    p.add_argument("--recipe-set", action="append", default=[], metavar="RECIPE:KEY=VALUE",
                   help="override for one recipe (repeat), e.g. supervised:data.train_split=train")
    p.add_argument("--tasks", default=None, help="evaluation tasks, comma-separated (default: the config's)")
    p.add_argument("--max-minutes", type=float, default=20.0, help="wall-time cap of each run's training (default 20)")
    p.add_argument("--out", default=None, help="run folders (default benchmark-runs/<name>)")
    p.add_argument("--results-dir", default=str(HERE / "results"), help="where <name>.json and <name>.md go")
    p.add_argument("--recipes-dir", default=str(HERE.parent / "configs" / "methods"), help="folder of recipe YAMLs")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--aggregate-only", action="store_true", help="run nothing; aggregate the finished runs")
    return p


def run(argv: list[str] | None = None) -> dict:
    """Run the grid and write the aggregate; returns it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command = "python benchmarks/compare.py " + " ".join(shlex.quote(a) for a in argv)
    args.dataset = str(Path(args.dataset).resolve())
    recipes, seeds = _split_list(args.recipes), [int(s) for s in _split_list(args.seeds)]
    if not recipes or not seeds:
        raise ConfigError("--recipes and --seeds: at least one each")
    out = Path(args.out or Path("benchmark-runs") / args.name)
    recipe_sets = parse_recipe_sets(args.recipe_set, recipes)
    benchmark = {"runner": "benchmarks/compare.py", "format": RESULT_FORMAT, "data": dataset_version(args.dataset)}
    cells = [Cell(r, s, None, out / "runs" / f"{r}-seed{s}") for r in recipes for s in seeds]
    for cell in cells:
        cell.cfg = recipe_config(cell.recipe, cell.seed, args, recipe_sets, cell.dir)
    accum = {c.cfg.train.accum_steps for c in cells}
    if len(accum) > 1:
        raise ConfigError(f"train.accum_steps differs between recipes ({sorted(accum)}): the budget (steps x batch) "
                          "must be the same for every recipe")

    results, flops = [], {}
    for cell in cells:
        done = finished_result(cell, benchmark)
        if done is None and not args.aggregate_only:
            if cell.recipe not in flops:
                flops[cell.recipe] = 0 if cell.recipe == RANDOM_INIT else measure_flops(cell.cfg)
            what = "at initialisation" if cell.recipe == RANDOM_INIT else f"trained on {trained_on(cell.cfg, cell.recipe)}"
            print(f"[{cell.dir.name}] {cell.cfg.method.name}, {what}")
            done = run_cell(cell, benchmark, flops[cell.recipe], args)
        elif done is not None:
            print(f"[{cell.dir.name}] finished earlier, skipping")
            # metrics added to the table since the run finished are read from its saved evaluation
            done["metrics"] = {**done["metrics"], **extract_metrics(done["evaluation"])}
        if done is not None:
            results.append(done)
    if not results:
        raise ConfigError(f"no finished runs in {out / 'runs'} to aggregate")
    data = {"name": args.name, "command": args.command, "date": utc_now(), "machine": machine_info(),
            "budget": {"steps": args.steps, "batch_size": args.batch_size, "max_minutes": args.max_minutes},
            **aggregate(results, recipes),
            "runs": [{k: r[k] for k in ("recipe", "seed", "capped", "metrics")} | {"result": str(out / "runs" /
                     f"{r['recipe']}-seed{r['seed']}" / "result.json")} for r in results]}
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    data["plots"] = plot_grid(data, results_dir, args.name)
    _write_json(results_dir / f"{args.name}.json", data)
    (results_dir / f"{args.name}.md").write_text(render_markdown(data))
    print(render_markdown(data))
    return data


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except MedvlpError as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
