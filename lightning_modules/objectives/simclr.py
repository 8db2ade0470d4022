"""SimCLR: two augmented views of each image, a projection head, NT-Xent (Chen et al. 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from datamodules.augment import BatchAugment
from lightning_modules.objectives.base import Objective
from lightning_modules.schema import check


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Normalised temperature-scaled cross-entropy: each view's positive is the other view of its image,
    its negatives are all other 2N-2 views in the batch."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.T) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


class SimCLR(Objective):
    def __init__(
        self,
        backbone,
        data,
        temperature: float = 0.2,
        proj_hidden: int = 256,
        proj_dim: int = 64,
        augment: dict | None = None,
    ):
        super().__init__(backbone, data)
        self.temperature = float(check("objective.temperature", temperature))
        self.augment = BatchAugment(**(augment or {}))
        self.projector = nn.Sequential(
            nn.Linear(backbone.num_features, proj_hidden),
            nn.BatchNorm1d(proj_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(proj_hidden, proj_dim),
        )

    def forward(self, backbone, batch):
        x = batch["image"]
        views = torch.cat([self.augment(x), self.augment(x)])
        z = self.projector(backbone(views))
        z1, z2 = z.chunk(2)
        return {"loss": nt_xent(z1, z2, self.temperature)}
