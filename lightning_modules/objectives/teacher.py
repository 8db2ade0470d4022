"""The teacher of the teacher–student objectives (BYOL, DINO): the student's backbone and head, copied, and moved
towards the student after every optimizer step by an exponential moving average of the weights.

From lightly: the update ``teacher = m * teacher + (1 - m) * student`` over parameters (``update_momentum``), its
cosine schedule for ``m`` from ``momentum`` to ``momentum_end`` over the run (``cosine_schedule``), and turning the
copy's gradients off (``deactivate_requires_grad``). What pretune adds is where they sit: the teacher is a submodule
of the objective, so it is in every checkpoint (a resumed run continues the same teacher) and in the EMA of weights
(``callbacks=ema``), but not in the optimizer (``optimized_parameters`` leaves it out), and the step ``m`` is read
at is the trainer's own (``Objective.progress``), restored on a resume with the rest of the loop.

Buffers (BatchNorm's running statistics) are not averaged: the teacher keeps its own, from its own forward passes
in training mode on the same views (batch statistics), as BYOL's and DINO's code run their target networks.
"""

from __future__ import annotations

import copy

import torch
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from lightning_modules.config.rules import check, check_together
from lightning_modules.objectives.base import Objective


class EmaTeacher(nn.Module):
    """``backbone`` and ``head`` as the student has them now, never trained by the optimizer."""

    def __init__(self, backbone: nn.Module, head: nn.Module, momentum: float, momentum_end: float):
        super().__init__()
        self.momentum = float(check("objective.momentum", momentum))
        self.momentum_end = float(check("objective.momentum_end", momentum_end))
        check_together({"objective.momentum": momentum, "objective.momentum_end": momentum_end})
        self.backbone, self.head = copy.deepcopy(backbone), copy.deepcopy(head)
        deactivate_requires_grad(self)

    def momentum_at(self, step: int, total: int) -> float:
        """``m`` for the update after optimizer step ``step`` (0-based) of ``total``: a cosine from ``momentum`` at
        the first step to ``momentum_end`` at the last."""
        return cosine_schedule(min(step, total), total, self.momentum, self.momentum_end)

    @torch.no_grad()
    def update(self, backbone: nn.Module, head: nn.Module, step: int, total: int) -> float:
        """Move towards the student's ``backbone`` and ``head``; returns the momentum used."""
        m = self.momentum_at(step, total)
        update_momentum(backbone, self.backbone, m)
        update_momentum(head, self.head, m)
        return m

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone({"image": images}))


class TeacherStudent(Objective):
    """What BYOL and DINO share: a teacher made in ``make_teacher`` from the backbone and the student's head that
    the teacher copies (``teacher_of``), moved after every optimizer step, left out of the optimizer, and exported
    in the student's place when ``objective.export=teacher``."""

    teacher_of: str  # the attribute holding the student's head the teacher copies (BYOL: projector, DINO: head)

    def make_teacher(self, backbone, momentum: float, momentum_end: float, export: str) -> None:
        self.export = check("objective.export", export)
        self.teacher = EmaTeacher(backbone, getattr(self, self.teacher_of), momentum, momentum_end)

    def after_step(self, backbone) -> None:
        self.teacher.update(backbone, getattr(self, self.teacher_of), *self.progress)

    def optimized_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if not n.startswith("teacher.")}

    def exported_backbone(self, backbone):
        if self.export == "teacher":
            return self.teacher.backbone, "teacher: the EMA of the trained backbone (objective.export=teacher)"
        return backbone, "student: the trained backbone (objective.export=student)"
