"""Process-group helpers and cross-rank feature gathering.

This module sits below ``losses`` and ``train`` and imports neither: losses use
:func:`gather_features` to build the global similarity matrix, the training loop uses
:func:`init_distributed` and the rank helpers. Every function is a no-op (or returns
the single-process answer) when ``torch.distributed`` is not initialised, so the same
code runs in one process and under ``torchrun``.

Gathering comes in two flavours (open_clip's ``gather_with_grad`` option):

* ``gather_with_grad=True``: the gather is differentiable. Its backward sums, over
  ranks, the gradients every rank computed for each slice of the gathered tensor and
  hands each rank the sum for its own slice. Combined with DDP's gradient averaging this
  reproduces the single-process gradient (see :mod:`medvlp.losses.contrastive`).
* ``gather_with_grad=False``: the other ranks' features are constants; only this rank's
  slice (re-inserted from the local, grad-carrying tensor) receives gradient.

All ranks must pass tensors of the same shape: under DDP the training data loader drops
the last incomplete batch.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from medvlp.errors import ConfigError

__all__ = [
    "all_reduce_sum",
    "barrier",
    "destroy_distributed",
    "gather_features",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def is_distributed() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank of this process (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0: the process that writes logs, checkpoints and reports."""
    return get_rank() == 0


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ConfigError(f"environment variable {name} is not set; launch with torchrun, which sets it")
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; launch with torchrun") from None


def init_distributed(backend: str | None = None) -> tuple[int, int, int]:
    """Initialise the default process group from torchrun's environment variables.

    Args:
        backend: ``"gloo"``, ``"nccl"`` or None for the default: ``nccl`` when CUDA is
            available, ``gloo`` otherwise.

    Returns:
        ``(rank, world_size, local_rank)``; ``(0, 1, 0)`` without initialising anything
        when the process was not launched by torchrun (``RANK``/``WORLD_SIZE`` unset).
        Calling it again once initialised returns the current values.

    Raises:
        ConfigError: torchrun's variables are incomplete or malformed, or ``nccl`` was
            asked for without CUDA.
    """
    if is_distributed():
        return get_rank(), get_world_size(), _env_int("LOCAL_RANK", 0)
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
    if missing:
        raise ConfigError(
            f"distributed launch is incomplete: environment variable(s) {', '.join(missing)} not set; "
            "launch with `torchrun --nproc_per_node=N ...`, which sets RANK, WORLD_SIZE, LOCAL_RANK, "
            "MASTER_ADDR and MASTER_PORT"
        )
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK", 0)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ConfigError("distributed backend 'nccl' needs CUDA; use backend 'gloo' on CPU")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
    return rank, world_size, local_rank


def destroy_distributed() -> None:
    """Tear down the default process group if one exists."""
    if is_distributed():
        dist.destroy_process_group()


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Plain (non-differentiable) all-gather along dim 0: (B, ...) -> (world*B, ...)."""
    tensor = tensor.contiguous()
    out = tensor.new_empty((get_world_size() * tensor.shape[0], *tensor.shape[1:]))
    dist.all_gather_into_tensor(out, tensor)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward returns, to each rank, the cross-rank sum of the
    gradients for that rank's slice (a reduce-scatter of the incoming gradient)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.local_batch = tensor.shape[0]
        return _all_gather(tensor)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        grad_output = grad_output.contiguous()
        batch = ctx.local_batch
        if dist.get_backend() == "nccl":
            grad = grad_output.new_empty((batch, *grad_output.shape[1:]))
            dist.reduce_scatter_tensor(grad, grad_output, op=dist.ReduceOp.SUM)
            return grad
        # gloo in older torch releases has no reduce-scatter: all-reduce and slice
        # (world x more traffic, irrelevant on CPU test setups).
        summed = grad_output.clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        start = get_rank() * batch
        return summed[start : start + batch]


def gather_features(features: torch.Tensor, *, gather_with_grad: bool) -> torch.Tensor:
    """All-gather ``features`` along dim 0 across ranks, in rank order.

    Args:
        features: (B, ...) this rank's tensor; B and the trailing shape must be the same
            on every rank.
        gather_with_grad: True: gradients flow back to every rank's features (the
            backward sums each slice's gradient over ranks). False: the other ranks'
            slices are constants and only the local slice, which is ``features`` itself,
            carries gradient.

    Returns:
        (world*B, ...) tensor whose rows ``rank*B : (rank+1)*B`` are this rank's
        ``features``; ``features`` unchanged when not distributed or world size is 1.
    """
    if not is_distributed() or get_world_size() == 1:
        return features
    if gather_with_grad:
        return _GatherWithGrad.apply(features)
    with torch.no_grad():
        gathered = _all_gather(features.detach())
    batch, rank = features.shape[0], get_rank()
    return torch.cat([gathered[: rank * batch], features, gathered[(rank + 1) * batch :]], dim=0)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over ranks (no-op when not distributed); returns it."""
    if is_distributed() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` in place over ranks (no-op when not distributed)."""
    if is_distributed() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed() and get_world_size() > 1:
        dist.barrier()
