"""Knowledge distillation loss on hand-computable values, and the training loop's teacher option."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from deprune_plugin import distillation_loss
from deprune_plugin.app.training import train


def test_equal_uniform_logits_leave_only_the_label_term():
    s = t = torch.zeros(1, 2)
    # KL = 0; CE of a uniform 2-way prediction = ln 2; half of it
    loss = distillation_loss(s, t, torch.tensor([0]), temperature=1.0, alpha=0.5)
    assert float(loss) == pytest.approx(0.5 * math.log(2))


def test_soft_term_is_the_kl_divergence_times_t_squared():
    s = torch.zeros(1, 2)                                   # student: (0.5, 0.5)
    t = torch.tensor([[math.log(3.0), 0.0]])               # teacher: (0.75, 0.25)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)   # = 0.1308...
    assert float(distillation_loss(s, t, torch.tensor([1]), temperature=1.0, alpha=1.0)) == pytest.approx(kl)
    # logits scaled by T with temperature T give the same distributions: the soft term scales by T^2
    scaled = distillation_loss(2 * s, 2 * t, torch.tensor([1]), temperature=2.0, alpha=1.0)
    assert float(scaled) == pytest.approx(4 * kl)
    # alpha = 0: plain cross-entropy, the teacher is irrelevant
    ce = float(nn.functional.cross_entropy(torch.tensor([[2.0, -1.0]]), torch.tensor([1])))
    assert float(distillation_loss(torch.tensor([[2.0, -1.0]]), t, torch.tensor([1]), alpha=0.0)) == pytest.approx(ce)


def test_no_gradient_reaches_the_teacher_logits():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    distillation_loss(s, t, torch.tensor([0, 1, 2])).backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize("kwargs,match", [({"temperature": 0}, "temperature"), ({"alpha": 1.5}, "alpha")])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), **kwargs)


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 5, generator=g), torch.randint(0, 3, (32,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def test_train_with_a_teacher_at_alpha_zero_equals_plain_training():
    torch.manual_seed(1)
    a = nn.Linear(5, 3)
    b = nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    teacher = nn.Linear(5, 3)
    la = train(a, _data(), 2, lr=0.1, quiet=True)
    lb = train(b, _data(), 2, lr=0.1, quiet=True, teacher=teacher, kd_alpha=0.0)
    assert la == pytest.approx(lb)
    assert torch.equal(a.weight, b.weight)


def test_train_with_a_teacher_pulls_the_student_towards_it():
    torch.manual_seed(2)
    student, teacher = nn.Linear(5, 3), nn.Linear(5, 3)
    x = _data().dataset.tensors[0]
    def gap() -> float:
        with torch.no_grad():
            return float(nn.functional.kl_div(student(x).log_softmax(1), teacher(x).log_softmax(1),
                                              log_target=True, reduction="batchmean"))
    before = gap()
    train(student, _data(), 20, lr=0.1, quiet=True, teacher=teacher, kd_alpha=1.0, kd_temperature=1.0)
    assert gap() < 0.5 * before
    assert not teacher.training  # the teacher ran in eval mode
