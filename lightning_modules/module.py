"""The LightningModule shared by pre-training and fine-tuning: a backbone plus an objective.

The objective decides the loss and the metrics; this module only wires them to Lightning's
loops, the optimizer and the schedule.
"""

from __future__ import annotations

import pytorch_lightning as pl

from lightning_modules.optim import build_optimizer, build_scheduler


class PretuneModule(pl.LightningModule):
    def __init__(self, backbone, objective, optimizer: dict, scheduler: dict):
        super().__init__()
        self.backbone, self.objective = backbone, objective
        self.optimizer_cfg, self.scheduler_cfg = dict(optimizer), dict(scheduler)
        self.val_metrics = objective.make_metrics("val/")
        self.test_metrics = objective.make_metrics("test/")

    def forward(self, batch):
        return self.objective(self.backbone, batch)

    def training_step(self, batch, batch_idx):
        out = self(batch)
        self.log("train/loss", out["loss"], on_step=True, on_epoch=True, prog_bar=True)
        return out["loss"]

    def _eval_step(self, batch, split: str, metrics):
        out = self(batch)
        self.log(
            f"{split}/loss",
            out["loss"],
            on_epoch=True,
            prog_bar=split == "val",
            batch_size=len(next(iter(batch.values()))),
        )
        if metrics is not None:
            self.objective.update_metrics(metrics, out)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val", self.val_metrics)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test", self.test_metrics)

    def _log_metrics(self, metrics):
        # Computed once per epoch from accumulated state: no per-step metric syncs.
        if metrics is not None:
            self.log_dict(metrics.compute(), prog_bar=True)
            metrics.reset()

    def on_validation_epoch_end(self):
        self._log_metrics(self.val_metrics)

    def on_test_epoch_end(self):
        self._log_metrics(self.test_metrics)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.optimizer_cfg, self.backbone, self.objective)
        scheduler = build_scheduler(self.scheduler_cfg, optimizer, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
