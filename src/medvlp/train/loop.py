"""The pre-training loop: one function, ``pretrain(cfg)``, for every method.

- Batches: ``data.batch_size`` samples per rank per micro-batch; one optimizer step is
  ``train.accum_steps`` micro-batches, so the global batch is batch_size x world x accum.
  (Contrastive negatives come from a micro-batch gathered across ranks, not from the
  accumulated batch.)
- Data: the mixed-source stream of :mod:`medvlp.data.mixed` (``data.sources``, or
  ``data.train_split`` as paired samples); its state is one integer, the batches consumed.
- Randomness: one seed. The data order and augmentation are functions of (seed, source,
  source epoch, position); the torch RNG (dropout, masking noise) is re-seeded from (seed, rank, step,
  micro-batch) before every forward pass. Resuming therefore continues exactly, with no RNG state to carry.
- Precision: ``auto`` is bf16 autocast on CUDA devices that support it and fp32 on CPU;
  ``bf16`` autocast is also available on CPU; ``fp16`` uses a gradient scaler (CUDA).
- Checkpoints every ``train.save_every`` steps and at the end (see ``checkpoint.py``).
- Time limit: with ``train.time_limit_minutes`` > 0 the loop stops once the training steps
  (summed over resumes) have run that long, saving a checkpoint whose ``trainer_state.json``
  says ``"time_limited": true``; a budgeted comparison then evaluates what was reached.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from medvlp.config import to_dict
from medvlp.data.manifest import read_info
from medvlp.data.mixed import MixedStream, read_sources
from medvlp.data.transforms import IMAGE_CACHE, Preprocess
from medvlp.distributed import init_distributed, is_main_process
from medvlp.errors import ConfigError, DataError
from medvlp.hub import build_method
from medvlp.train import checkpoint as ckpt
from medvlp.train.logging import RunLogger
from medvlp.train.optim import build_optimizer, build_scheduler


def step_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """The torch RNG seed of one micro-batch: dropout and masking noise depend only on it."""
    return (seed * 1_000_003 + rank * 100_003 + step * 101 + micro) % (2**63 - 1)


def _all_agree(flag: bool, world: int, dev: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank: ranks must stop at the same step or the next collective hangs."""
    if world == 1:
        return flag
    value = torch.tensor([float(flag)], device=dev)
    torch.distributed.broadcast(value, 0)
    return bool(value.item())


def run_dir_for(cfg) -> Path:
    return Path(cfg.train.output_dir or os.path.join("runs", cfg.name))


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision: 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def prepare_tokenizer(cfg, samples, resume_from: Path | None):
    from medvlp.data.tokenize import load_tokenizer, train_wordpiece

    if resume_from is not None:
        return load_tokenizer(resume_from / "tokenizer")
    if cfg.model.text.name == "hf":
        if not Path(cfg.model.text.path).is_dir():
            raise ConfigError(f"model.text.path: {cfg.model.text.path} is not a folder; point it at a local "
                              "Hugging Face model folder (config.json, weights and tokenizer files)")
        return load_tokenizer(cfg.model.text.path)
    texts = [s.text(cfg.data.sections) for s in samples if s.has_text]
    if not texts:
        from medvlp.registry import METHODS

        method_cls = METHODS.get(cfg.method.name)
        if not getattr(method_cls, "supports_text", True) and not getattr(method_cls, "needs_tokenizer", False):
            # An image-only method still ships a tokenizer in its bundle (one format for every
            # checkpoint); with no reports to learn from it is a placeholder vocabulary. An
            # image-only-evaluated method that trains a text tower (MRM) sets needs_tokenizer.
            return train_wordpiece(["image only model without a text encoder"], 64)
        raise DataError("no reports in the paired training data (data.sources of kind 'paired', or "
                        "data.train_split) to train the tokenizer on; add a paired source or use a text.name 'hf' model")
    return train_wordpiece(texts, cfg.model.text.vocab_size)


def pretrain(cfg, *, resume: bool = False, device: str | None = None) -> Path:
    """Pre-train ``cfg.method`` on ``cfg.data``; returns the final checkpoint folder."""
    rank, world, local_rank = init_distributed()
    dev = torch.device(device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    if not cfg.data.manifest:
        raise ConfigError("data.manifest: required for pre-training (a dataset folder, e.g. from `medvlp synth`)")
    run_dir = run_dir_for(cfg)
    resume_from = ckpt.latest_checkpoint(run_dir) if resume else None
    if resume and resume_from is None:
        raise ConfigError(f"--resume: no checkpoint in {run_dir / ckpt.CKPT_DIR}; start without --resume")
    if not resume and ckpt.latest_checkpoint(run_dir) is not None:
        raise ConfigError(
            f"train.output_dir: {run_dir} already holds checkpoints of an earlier run; continue it with --resume, "
            "or choose another train.output_dir (or delete the folder) to start afresh"
        )
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    if cfg.data.shards:  # images streamed from tar shards; the reports' metadata is read once here
        from medvlp.data.stream import ShardStream, read_shard_sources

        sources, stream_cls, extra = read_shard_sources(cfg), ShardStream, {"shuffle_buffer": cfg.data.shuffle_buffer}
    else:
        sources, stream_cls, extra = read_sources(cfg), MixedStream, {}
    classes = read_info(cfg.data.manifest).get("classes", [])
    paired = [s for src in sources if src.kind in ("paired", "report") for s in src.samples]
    tokenizer = prepare_tokenizer(cfg, paired, resume_from)

    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg, tokenizer).to(dev)
    if any(src.kind == "report" for src in sources) and not method.takes_report_only_rows:
        raise ConfigError(f"data.sources: kind 'report' (reports without images) cannot train method "
                          f"{cfg.method.name!r}, which needs an image in every row; use it with medclip, or make the "
                          "source 'paired' if its samples have images")
    optimizer = build_optimizer(method, cfg.train, dev)
    scheduler = build_scheduler(optimizer, cfg.train)
    step, position, train_seconds = 0, 0, 0.0
    if resume_from is not None:
        ckpt.load_weights(method, resume_from)
        state = ckpt.load_training_state(resume_from, optimizer, scheduler)
        step, position = state["step"], int(state["position"]["batch"])
        train_seconds = float(state.get("train_seconds", 0.0))
    model = method
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(method, device_ids=[dev.index] if dev.type == "cuda" else None)

    pre = Preprocess.from_config(cfg)
    IMAGE_CACHE.configure(cfg.data.image_cache_mb)
    stream = stream_cls(sources, pre, tokenizer, classes, batch_size=cfg.data.batch_size,
                        max_length=cfg.model.text.max_length, sections=cfg.data.sections, seed=cfg.train.seed,
                        augment=cfg.data.augment, paired_labels=cfg.data.paired_labels,
                        num_workers=cfg.data.num_workers, rank=rank, world=world, position=position, **extra)
    amp_dtype = resolve_precision(cfg.train.precision, dev)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    logger = RunLogger(run_dir, enabled=is_main_process(), tensorboard=cfg.train.tensorboard)
    subjects = sorted({s.subject_id for src in sources for s in src.samples})
    image_hashes = sorted({s.meta["image_sha256"] for src in sources if src.kind != "report"  # images never read
                           for s in src.samples if s.meta.get("image_sha256")})

    def save(at_step: int) -> Path:
        path = run_dir / ckpt.CKPT_DIR / f"step_{at_step:08d}"
        if is_main_process():
            ckpt.save_checkpoint(path, model=method, cfg=cfg, tokenizer=tokenizer, classes=classes,
                                 preprocess=pre.to_dict(), pretrain_subjects=subjects, pretrain_images=image_hashes, optimizer=optimizer,
                                 scheduler=scheduler, trainer_state={"step": at_step, "position": {"batch": stream.position},
                                                                     "train_seconds": elapsed(), "time_limited": time_limited})
            ckpt.prune_checkpoints(run_dir, cfg.train.keep_checkpoints)
        if world > 1:
            torch.distributed.barrier()
        return path

    global_batch = cfg.data.batch_size * world * cfg.train.accum_steps
    bar = tqdm(total=cfg.train.steps, initial=step, disable=not (cfg.train.progress and is_main_process()),
               desc=f"pretrain {cfg.method.name}", unit="step", dynamic_ncols=True)
    batches = iter(stream)
    method.train()
    t_last, steps_since = time.perf_counter(), 0
    last_path = None
    limit_s, t_start, time_limited = cfg.train.time_limit_minutes * 60, time.perf_counter(), False

    def elapsed() -> float:
        return train_seconds + time.perf_counter() - t_start

    while step < cfg.train.steps:
        if limit_s and _all_agree(elapsed() >= limit_s, world, dev):
            time_limited = True
            logger.log(step, {"time_limited": 1.0, "train_seconds": elapsed()})
            if is_main_process():
                print(f"medvlp: train.time_limit_minutes={cfg.train.time_limit_minutes:g} reached at step {step} "
                      f"of {cfg.train.steps}; saving and stopping")
            last_path = save(step)
            break
        terms: dict[str, float] = {}
        for micro in range(cfg.train.accum_steps):
            batch = next(batches)
            # after fetching: creating a DataLoader iterator draws from the global RNG
            torch.manual_seed(step_seed(cfg.train.seed, rank, step, micro))
            logger.log_skipped(batch.skipped)
            batch = batch.to(dev)
            sync = contextlib.nullcontext()
            if world > 1 and micro < cfg.train.accum_steps - 1:
                sync = model.no_sync()
            with sync:
                with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = model(batch)
                loss = out["loss"] / cfg.train.accum_steps
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss at step {step}: {out}")
                (scaler.scale(loss) if scaler else loss).backward()
            for k, v in out.items():
                terms[k] = terms.get(k, 0.0) + float(v.detach()) / cfg.train.accum_steps
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(method.parameters(), cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_optimizer_step(step)
        step += 1
        steps_since += 1
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            now = time.perf_counter()
            sps = steps_since * global_batch / max(now - t_last, 1e-9)
            t_last, steps_since = now, 0
            logger.log(step, {**terms, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "samples_per_s": sps,
                              **{f"epoch/{k}": v for k, v in stream.epochs().items()}})
            bar.set_postfix(loss=f"{terms['loss']:.4f}", samples_s=f"{sps:.0f}")
        if (cfg.train.save_every and step % cfg.train.save_every == 0) or step == cfg.train.steps:
            last_path = save(step)
    bar.close()
    logger.close()
    if logger.skipped and is_main_process():
        print(f"medvlp: skipped {logger.skipped} unreadable samples; listed in {logger.skipped_path}")
    return last_path if last_path is not None else ckpt.latest_checkpoint(run_dir)
