"""An exponential-moving-average (EMA) teacher: a stop-gradient copy of a student module.

The conventions of METHODS.md: the teacher is updated once per optimizer step (a method calls
:meth:`EmaTeacher.update` from ``after_optimizer_step``, never from ``forward``), never receives
gradients (its parameters do not require them, so the optimizer's parameter groups and DDP's
gradient reduction skip them), and stays in eval mode even when the student's ``train()`` is
called (dropout off, the teacher is a fixed target within a step). Its weights live in the
method's ``state_dict``, so checkpoints carry them and resume is exact.

Update: ``t <- m * t + (1 - m) * s`` for every parameter, buffers copied from the student;
:func:`cosine_momentum` gives the usual schedule from a base momentum to 1 (BYOL, DINO).
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from medvlp.errors import ConfigError


def check_momentum(momentum: float, where: str = "momentum") -> float:
    if not 0.0 <= momentum <= 1.0:
        raise ConfigError(f"{where}: must be within [0, 1], got {momentum!r} (e.g. 0.996)")
    return float(momentum)


def cosine_momentum(step: int, total: int, base: float) -> float:
    """Momentum at optimizer step ``step`` of ``total``: ``base`` rising to 1 on a cosine."""
    progress = min(1.0, max(0.0, step / max(1, total)))
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * progress))


class EmaTeacher(nn.Module):
    """Wraps a deep copy of ``student``; call it like the student (no gradient flows)."""

    def __init__(self, student: nn.Module, momentum: float = 0.996):
        super().__init__()
        self.momentum = check_momentum(momentum)
        self.module = copy.deepcopy(student)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.module.eval()
        self.updates = 0  # how many times update() ran (tests, logging)

    def train(self, mode: bool = True) -> EmaTeacher:
        # the student's train() reaches here too: the teacher stays a fixed, dropout-free target
        return super().train(False)

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float | None = None) -> None:
        """One EMA step towards ``student`` (same architecture as at construction)."""
        m = self.momentum if momentum is None else check_momentum(momentum)
        t_params, s_params = list(self.module.parameters()), list(student.parameters())
        if len(t_params) != len(s_params):
            raise ValueError(f"EMA update: the student has {len(s_params)} parameters, the teacher {len(t_params)}")
        for t, s in zip(t_params, s_params):
            t.lerp_(s.detach().to(t.dtype), 1.0 - m)  # t + (1 - m)(s - t) = m t + (1 - m) s
        for t, s in zip(self.module.buffers(), student.buffers()):
            t.copy_(s)
        self.updates += 1
