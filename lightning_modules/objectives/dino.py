"""DINO (Caron et al. 2021): self-distillation with no labels. The student (backbone and head) sees every view of
an image, two global crops and ``local_views`` small local crops (multi-crop); the teacher (an EMA of the student)
sees the global crops only, and the student learns to give each view the teacher's distribution over ``out_dim``
prototypes for the other views. The teacher's outputs are centred (a running mean, ``center_momentum``) and
sharpened (``teacher_temp`` below the student's ``student_temp``), which keeps the two from collapsing.

From lightly: the head (``DINOProjectionHead``: a 3-layer MLP, an L2-normalised bottleneck, a weight-normalised
last layer), the loss with its centering and sharpening (``DINOLoss``, its center all-reduced under DDP: the mean
of equal shards, so the center one process keeps for the same global batch) and the teacher's momentum update
(``teacher.py``). Two things are not lightly's:

- the center moves in training only: lightly's ``DINOLoss`` moves it at every call, so validation batches (and the
  forgetting probe, which computes this loss after a fine-tune, each DDP rank alone) would move it too;
- the views: pretune's whole-batch augmentations (``BatchAugment``), drawn for the global batch under DDP, the
  local crops made at ``local_size`` pixels by the same affine crop (lightly's multi-crop transforms work image by
  image on PIL images). A backbone that takes one input size only (a timm ViT without
  ``model.kwargs.dynamic_img_size=true``) gets its local crops at its own size instead, noted once in the log.

Exported backbone: the teacher's (``objective.export=teacher``), the one DINO's authors evaluate and release.
"""

from __future__ import annotations

import warnings

import torch
from lightly.loss import DINOLoss
from lightly.models.modules.heads import DINOProjectionHead
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from lightning_modules.config.rules import check
from lightning_modules.objectives.teacher import TeacherStudent


class TrainingCenterDINOLoss(DINOLoss):
    """lightly's ``DINOLoss``, its center moved by training batches only (see the module's docstring)."""

    def update_center(self, teacher_out: torch.Tensor) -> None:
        if self.training:
            super().update_center(teacher_out)


def dino_head(width: int, hidden: int, bottleneck: int, out_dim: int, bn: bool, norm_last_layer: bool) -> nn.Module:
    """lightly's ``DINOProjectionHead``, its last layer's weight normalisation redone with torch's parametrization:
    lightly uses ``torch.nn.utils.weight_norm`` (deprecated), whose computed weight cannot be deep-copied, and the
    teacher, the EMA of weights (``callbacks=ema``) and the forgetting probe all copy the head. The same function:
    the weight's norm ``g`` (1, fixed with ``norm_last_layer``) times ``v / ||v||``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # lightly's weight_norm, replaced just below
        head = DINOProjectionHead(width, hidden, bottleneck, out_dim, batch_norm=bn, norm_last_layer=norm_last_layer)
    nn.utils.remove_weight_norm(head.last_layer)
    head.last_layer = nn.utils.parametrizations.weight_norm(head.last_layer)
    head.last_layer.parametrizations.weight.original0.requires_grad_(not norm_last_layer)
    return head


def takes_any_size(backbone) -> bool:
    """Whether the backbone runs on inputs of another size than its own (a CNN does; a timm ViT when built with
    ``dynamic_img_size``)."""
    model = getattr(backbone, "model", None)
    return getattr(model, "patch_embed", None) is None or bool(getattr(model, "dynamic_img_size", False))


class DINO(TeacherStudent):
    teacher_of = "head"

    def __init__(
        self,
        backbone,
        data,
        out_dim: int = 1024,
        head_hidden: int = 256,
        bottleneck_dim: int = 64,
        head_bn: bool = False,
        norm_last_layer: bool = True,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        teacher_temp_warmup: float = 0.0,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        momentum: float = 0.996,
        momentum_end: float = 1.0,
        local_views: int = 6,
        local_size: int | None = None,
        export: str = "teacher",
        augment: dict | None = None,
        augment_2: dict | None = None,
        local_augment: dict | None = None,
    ):
        super().__init__(backbone, data)
        self.local_views = check("objective.local_views", local_views)
        local_size = check("objective.local_size", local_size)
        if local_size is not None and not takes_any_size(backbone) and local_size != data.image_size:
            rank_zero_info(
                f"objective.local_size={local_size}: the backbone takes {data.image_size}-pixel inputs only, so the"
                f" local crops are made at {data.image_size} (model.kwargs.dynamic_img_size=true for a timm ViT)"
            )
            local_size = None
        self.augment = self.view_augment("augment", augment)
        self.augment_2 = self.view_augment("augment_2", augment_2)
        local = dict(local_augment or {}, **({"size": local_size} if local_size is not None else {}))
        self.local_augment = self.view_augment("local_augment", local)
        self.head = dino_head(
            backbone.num_features,
            check("objective.head_hidden", head_hidden),
            check("objective.bottleneck_dim", bottleneck_dim),
            check("objective.out_dim", out_dim),
            check("objective.head_bn", head_bn),
            check("objective.norm_last_layer", norm_last_layer),
        )
        self.make_teacher(backbone, momentum, momentum_end, export)
        self.teacher_temp = float(check("objective.teacher_temp", teacher_temp))
        self.warmup_teacher_temp = float(check("objective.warmup_teacher_temp", warmup_teacher_temp))
        self.teacher_temp_warmup = float(check("objective.teacher_temp_warmup", teacher_temp_warmup))
        self.criterion = TrainingCenterDINOLoss(
            out_dim,
            teacher_temp=self.teacher_temp,
            student_temp=float(check("objective.student_temp", student_temp)),
            center_momentum=float(check("objective.center_momentum", center_momentum)),
        )

    def current_teacher_temp(self) -> float:
        """Linear from ``warmup_teacher_temp`` to ``teacher_temp`` over the first ``teacher_temp_warmup`` of the
        run's steps, then ``teacher_temp`` (DINO warms it up over its first 30 epochs)."""
        step, total = self.progress
        warmup = self.teacher_temp_warmup * total
        if not self.training or step >= warmup:
            return self.teacher_temp
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * step / warmup

    def forward(self, backbone, batch):
        x = batch["image"]
        global_views = torch.cat([self.augment(x), self.augment_2(x)])
        student = list(self.head(backbone({"image": global_views})).chunk(2))
        if self.local_views:  # one pass for all local crops (their own size, their own batch statistics)
            local_views = torch.cat([self.local_augment(x) for _ in range(self.local_views)])
            student += list(self.head(backbone({"image": local_views})).chunk(self.local_views))
        teacher = list(self.teacher(global_views).chunk(2))
        return {"loss": self.criterion(teacher, student, teacher_temp=self.current_teacher_temp())}
