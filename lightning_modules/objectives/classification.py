"""Supervised classification: a linear head on the pooled features, cross-entropy; optionally
mixup/cutmix (timm's ``Mixup``) with the matching soft-target loss on training batches."""

from __future__ import annotations

import torch.nn.functional as F
import torchmetrics
from torch import nn

from lightning_modules.config.rules import check
from lightning_modules.core.errors import ConfigError
from lightning_modules.objectives.base import Objective


class Classification(Objective):
    modalities = ("image", "text")
    supervised = True

    def __init__(
        self,
        backbone,
        data,
        label_smoothing: float = 0.0,
        head_dropout: float = 0.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mix_prob: float = 1.0,
    ):
        super().__init__(backbone, data)
        self.num_classes = data.num_classes
        self.label_smoothing = label_smoothing
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(backbone.num_features, self.num_classes))
        for key, value in (("mixup", mixup), ("cutmix", cutmix), ("mix_prob", mix_prob)):
            check(f"objective.{key}", value)
        self.mix = None
        if (mixup > 0 or cutmix > 0) and data.modality != "image":
            raise ConfigError(f"objective.mixup/cutmix mix images; the data here is {data.modality}: set them to 0")
        if mixup > 0 or cutmix > 0:
            from timm.data import Mixup

            self.mix = Mixup(
                mixup_alpha=mixup,
                cutmix_alpha=cutmix,
                prob=mix_prob,
                label_smoothing=label_smoothing,
                num_classes=self.num_classes,
            )

    @property
    def linear_head(self) -> nn.Linear:
        """The head as it classifies at evaluation (its dropout is off then): what a fine-tune's ``model/`` puts on
        the backbone (``callbacks/model_export.py``)."""
        return self.head[1]

    @property
    def pooled_only(self) -> bool:
        return self.mix is None  # mixup/cutmix change the images the backbone sees

    def forward(self, backbone, batch):
        labels = batch["label"]
        if self.training and self.mix is not None:
            images = batch["image"]
            if len(images) % 2:
                raise ConfigError(f"objective.mixup/cutmix need an even datamodule.batch_size, got {len(images)}")
            # timm mixes in place: work on a copy, never on the caller's batch. Soft targets carry the smoothing.
            images, soft = self.mix(images.clone(), labels)
            logits = self.head(backbone({**batch, "image": images}))
            loss = -(soft * F.log_softmax(logits, dim=-1)).sum(-1).mean()
        else:
            logits = self.head(backbone(batch))
            loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return {"loss": loss, "logits": logits, "target": labels}

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
