"""SimCLR: two augmented views of each image, a projection head, NT-Xent (Chen et al. 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.config.rules import check
from lightning_modules.core.distributed import gather_with_grad
from lightning_modules.objectives.base import Objective


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Normalised temperature-scaled cross-entropy: each view's positive is the other view of its image,
    its negatives are all other 2N-2 views in the *global* batch.

    Under DDP each rank holds N/W images: its 2N/W views are the anchors, and the views of all ranks,
    gathered with gradients, are the candidates. The mean over ranks of this loss is then the loss of
    the global batch on one process, and DDP's gradient averaging gives its gradient exactly."""
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    n = z1.shape[0]
    (all1, offset), (all2, _) = gather_with_grad(z1), gather_with_grad(z2)
    candidates = torch.cat([all1, all2])  # [all first views; all second views]
    total = len(all1)  # images in the global batch
    own = offset + torch.arange(n, device=z1.device)  # this rank's images, as global indices
    sim = (torch.cat([z1, z2]) @ candidates.T) / temperature
    anchors = torch.arange(2 * n, device=z1.device)
    sim[anchors, torch.cat([own, own + total])] = float("-inf")  # a view is not its own negative
    targets = torch.cat([own + total, own])
    return F.cross_entropy(sim, targets)


class SimCLR(Objective):
    def __init__(
        self,
        backbone,
        data,
        temperature: float = 0.2,
        proj_hidden: int = 256,
        proj_dim: int = 64,
        proj_bn: bool = True,
        augment: dict | None = None,
    ):
        super().__init__(backbone, data)
        self.temperature = float(check("objective.temperature", temperature))
        self.augment = self.view_augment("augment", augment)
        self.projector = nn.Sequential(
            nn.Linear(backbone.num_features, proj_hidden),
            # Batch statistics are per rank under DDP unless trainer.sync_batchnorm=true (CUDA only);
            # proj_bn=false drops this BatchNorm, e.g. for DDP on CPU.
            nn.BatchNorm1d(proj_hidden) if proj_bn else nn.Identity(),
            nn.ReLU(inplace=True),
            nn.Linear(proj_hidden, proj_dim),
        )

    def forward(self, backbone, batch):
        x = batch["image"]
        views = torch.cat([self.augment(x), self.augment(x)])
        z = self.projector(backbone({"image": views}))
        z1, z2 = z.chunk(2)
        return {"loss": nt_xent(z1, z2, self.temperature)}
