"""VICReg (Bardes et al. 2022): two views of each image, a projector, and a loss of three terms on the projections:
invariance (the mean squared distance between the two views' projections), variance (a hinge keeping every
dimension's standard deviation over the batch at 1 or more, for each view) and covariance (the squared
off-diagonal covariances of each view, over the dimension): ``invariance * I + variance * V + covariance * C``.
No negatives and no teacher: the variance and covariance terms keep the projections from collapsing.

From lightly: the projector (``VICRegProjectionHead``: Linear, BatchNorm, ReLU blocks) and the three terms
(``lightly.loss.vicreg_loss``: ``invariance_loss``, ``variance_loss``, ``covariance_loss``, the functions its
``VICRegLoss`` adds up). Not its ``VICRegLoss`` module: under DDP the variance and covariance must be those of the
global batch, and its gather (``gather_distributed``) needs equal shards on every rank, while a last evaluation
batch splits unevenly here, and it gathers even where a rank computes alone (the forgetting probe). So the
projections are gathered by pretune's ``gather_with_grad`` (as SimCLR's negatives are): the invariance term stays
per rank (a mean, which DDP's gradient averaging makes the global batch's), the other two see the global batch.
"""

from __future__ import annotations

import torch
from lightly.loss.vicreg_loss import covariance_loss, invariance_loss, variance_loss
from lightly.models.modules.heads import VICRegProjectionHead

from lightning_modules.config.rules import check
from lightning_modules.core.distributed import gather_with_grad
from lightning_modules.objectives.base import Objective


def vicreg_loss(
    z1: torch.Tensor, z2: torch.Tensor, invariance: float, variance: float, covariance: float, eps: float = 1e-4
) -> torch.Tensor:
    """The VICReg loss of this rank's projections ``z1``, ``z2`` (one row per image), the variance and covariance
    over the global batch (all ranks' rows)."""
    inv = invariance_loss(z1, z2)
    (all1, _), (all2, _) = gather_with_grad(z1), gather_with_grad(z2)
    var = 0.5 * (variance_loss(all1, eps) + variance_loss(all2, eps))
    cov = covariance_loss(all1) + covariance_loss(all2)
    return invariance * inv + variance * var + covariance * cov


class VICReg(Objective):
    def __init__(
        self,
        backbone,
        data,
        proj_hidden: int = 512,
        proj_dim: int = 512,
        proj_layers: int = 3,
        invariance: float = 25.0,
        variance: float = 25.0,
        covariance: float = 1.0,
        augment: dict | None = None,
    ):
        super().__init__(backbone, data)
        self.weights = tuple(
            float(check(f"objective.{k}", v))
            for k, v in (("invariance", invariance), ("variance", variance), ("covariance", covariance))
        )
        self.augment = self.view_augment("augment", augment)
        self.projector = VICRegProjectionHead(
            backbone.num_features,
            check("objective.proj_hidden", proj_hidden),
            check("objective.proj_dim", proj_dim),
            check("objective.proj_layers", proj_layers),
        )

    def forward(self, backbone, batch):
        x = batch["image"]
        views = torch.cat([self.augment(x), self.augment(x)])
        z1, z2 = self.projector(backbone({"image": views})).chunk(2)
        return {"loss": vicreg_loss(z1, z2, *self.weights)}
