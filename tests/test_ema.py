"""EMA teacher: no gradient, not optimised, momentum update by hand, eval mode kept."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medvlp.errors import ConfigError
from medvlp.models.ema import EmaTeacher, cosine_momentum
from medvlp.train.optim import build_optimizer, param_groups


class Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.drop = nn.Dropout(0.5)
        self.norm = nn.BatchNorm1d(2)

    def forward(self, x):
        return self.norm(self.drop(self.lin(x)))


class Method(nn.Module):
    def __init__(self, momentum=0.9):
        super().__init__()
        self.student = Student()
        self.teacher = EmaTeacher(self.student, momentum)

    def forward(self, x):
        return (self.student(x) - self.teacher(x)).pow(2).mean()

    def after_optimizer_step(self, step):
        self.teacher.update(self.student)


def test_teacher_gets_no_gradient_and_is_not_optimised():
    torch.manual_seed(0)
    m = Method()
    m.train()
    loss = m(torch.randn(8, 3))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())
    assert all(p.grad is not None for p in m.student.parameters())
    grouped = {id(p) for g in param_groups(m, 0.1) for p in g["params"]}
    assert grouped == {id(p) for p in m.student.parameters()}
    assert all(id(p) not in grouped for p in m.teacher.parameters())
    assert set(m.state_dict()) >= {"teacher.module.lin.weight", "teacher.module.norm.running_mean"}  # checkpointed


def test_update_moves_by_the_momentum_once_per_optimizer_step():
    torch.manual_seed(0)
    m = Method(momentum=0.9)
    t0 = m.teacher.module.lin.weight.clone()
    opt = build_optimizer(m, type("T", (), {"lr": 0.1, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.0})(),
                          torch.device("cpu"))
    for step in range(3):
        for _ in range(2):  # two micro-batches: forward/backward never touch the teacher
            m(torch.randn(8, 3)).backward()
            assert torch.equal(m.teacher.module.lin.weight, t0)
        opt.step()
        opt.zero_grad()
        s = m.student.lin.weight.detach().clone()
        m.after_optimizer_step(step)
        expected = 0.9 * t0 + 0.1 * s
        assert torch.allclose(m.teacher.module.lin.weight, expected, atol=1e-7)
        assert torch.equal(m.teacher.module.norm.running_mean, m.student.norm.running_mean)  # buffers copied
        t0 = m.teacher.module.lin.weight.clone()
    assert m.teacher.updates == 3


def test_teacher_stays_in_eval_mode():
    m = Method()
    m.train()
    assert m.student.training and not m.teacher.training and not m.teacher.module.drop.training
    x = torch.randn(4, 3)
    assert torch.equal(m.teacher(x), m.teacher(x))  # no dropout noise


def test_momentum_bounds_and_cosine_schedule():
    with pytest.raises(ConfigError, match="momentum"):
        EmaTeacher(Student(), 1.5)
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)
