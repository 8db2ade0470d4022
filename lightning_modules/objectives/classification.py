"""Supervised classification: a linear head on the pooled features, cross-entropy."""

from __future__ import annotations

import torch.nn.functional as F
import torchmetrics
from torch import nn

from lightning_modules.objectives.base import Objective


class Classification(Objective):
    def __init__(self, backbone, data, label_smoothing: float = 0.0, head_dropout: float = 0.0):
        super().__init__(backbone, data)
        self.num_classes = data.num_classes
        self.label_smoothing = label_smoothing
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(backbone.num_features, self.num_classes))

    def forward(self, backbone, batch):
        logits = self.head(backbone(batch["image"]))
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing)
        return {"loss": loss, "logits": logits, "target": batch["label"]}

    def make_metrics(self, prefix: str):
        n = self.num_classes
        return torchmetrics.MetricCollection(
            {
                "acc": torchmetrics.classification.MulticlassAccuracy(n, average="micro"),
                "f1": torchmetrics.classification.MulticlassF1Score(n, average="macro"),
            },
            prefix=prefix,
        )

    def update_metrics(self, metrics, output: dict) -> None:
        metrics.update(output["logits"].detach(), output["target"])
