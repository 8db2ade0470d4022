"""BYOL (Grill et al. 2020): two views of each image; the student (online network: backbone, projector, predictor)
predicts the teacher's (target network: an EMA of the student's backbone and projector) projection of the other
view. No negatives: the predictor and the slowly moving teacher keep it from collapsing.

From lightly: the projection and prediction heads (``BYOLProjectionHead``, ``BYOLPredictionHead``: Linear, BatchNorm,
ReLU, Linear), the loss (``NegativeCosineSimilarity``, symmetrised over the two views as lightly's and the paper's
code do; it ranges over [-1, 1], the paper's 2 - 2·cos is this loss times 2 plus 2) and the teacher's momentum
update (``teacher.py``). The views are pretune's whole-batch augmentations (``BatchAugment``), two recipes as the
paper's (``augment``: blur always, no solarization; ``augment_2``: blur 0.1, solarize 0.2), drawn for the global
batch under DDP as every augmentation here is: lightly's transforms work image by image on PIL images.

Exported backbone: the student's (``objective.export=student``), as the paper keeps the online encoder.
"""

from __future__ import annotations

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead

from lightning_modules.config.rules import check
from lightning_modules.objectives.teacher import TeacherStudent


class BYOL(TeacherStudent):
    teacher_of = "projector"  # the teacher: backbone and projector; the predictor is the student's alone

    def __init__(
        self,
        backbone,
        data,
        proj_hidden: int = 512,
        proj_dim: int = 128,
        pred_hidden: int = 512,
        momentum: float = 0.99,
        momentum_end: float = 1.0,
        export: str = "student",
        augment: dict | None = None,
        augment_2: dict | None = None,
    ):
        super().__init__(backbone, data)
        self.augment = self.view_augment("augment", augment)
        self.augment_2 = self.view_augment("augment_2", augment_2)
        proj_dim = check("objective.proj_dim", proj_dim)
        self.projector = BYOLProjectionHead(
            backbone.num_features, check("objective.proj_hidden", proj_hidden), proj_dim
        )
        self.predictor = BYOLPredictionHead(proj_dim, check("objective.pred_hidden", pred_hidden), proj_dim)
        self.make_teacher(backbone, momentum, momentum_end, export)
        self.criterion = NegativeCosineSimilarity()

    def forward(self, backbone, batch):
        x = batch["image"]
        views = torch.cat([self.augment(x), self.augment_2(x)])
        p1, p2 = self.predictor(self.projector(backbone({"image": views}))).chunk(2)
        z1, z2 = self.teacher(views).chunk(2)
        return {"loss": 0.5 * (self.criterion(p1, z2) + self.criterion(p2, z1))}
