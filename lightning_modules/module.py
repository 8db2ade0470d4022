"""The LightningModule shared by pre-training and fine-tuning: a backbone plus an objective.

The objective decides the loss and the metrics; this module only wires them to Lightning's
loops, the optimizer and the schedule.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from lightning_modules.config.errors import TrainingDiverged
from lightning_modules.optim import build_optimizer, build_scheduler, refresh_lrs


class PretuneModule(pl.LightningModule):
    def __init__(self, backbone, objective, optimizer: dict, scheduler: dict, l2_sp: float = 0.0):
        super().__init__()
        self.backbone, self.objective = backbone, objective
        self.l2_sp = float(l2_sp)
        # L2-SP pulls towards the weights the backbone starts from (the pre-trained ones), not towards 0.
        # Non-persistent buffers: they follow the module's device but stay out of checkpoints, since a
        # resumed run rebuilds them from model.init, as it started.
        self._anchor_names = []
        if self.l2_sp > 0:
            for i, (name, p) in enumerate(backbone.named_parameters()):
                self.register_buffer(f"_l2sp_anchor_{i}", p.detach().clone(), persistent=False)
                self._anchor_names.append(name)
        self.optimizer_cfg, self.scheduler_cfg = dict(optimizer), dict(scheduler)
        self.val_metrics = objective.make_metrics("val/")
        self.test_metrics = objective.make_metrics("test/")

    def forward(self, batch):
        return self.objective(self.backbone, batch)

    def l2_sp_penalty(self):
        """``alpha/2 * sum ||w - w_init||^2`` over the backbone's trainable parameters."""
        params = dict(self.backbone.named_parameters())
        total = sum(
            ((params[n] - getattr(self, f"_l2sp_anchor_{i}")) ** 2).sum()
            for i, n in enumerate(self._anchor_names)
            if params[n].requires_grad
        )
        return 0.5 * self.l2_sp * total

    def on_train_epoch_start(self):
        self._loss_sum, self._loss_steps = torch.zeros((), device=self.device), 0

    # A checkpoint written in the middle of an epoch carries the epoch's running loss: a run resumed there
    # (Lightning then skips on_train_epoch_start) logs the mean over all of the epoch's steps, as uninterrupted.
    def on_save_checkpoint(self, checkpoint):
        if getattr(self, "_loss_sum", None) is not None:
            checkpoint["train_loss_running"] = [self._loss_sum.detach().cpu(), self._loss_steps]

    def on_load_checkpoint(self, checkpoint):
        if "train_loss_running" in checkpoint:
            self._loss_sum, self._loss_steps = checkpoint["train_loss_running"]

    def on_train_start(self):
        if getattr(self, "_loss_sum", None) is not None:  # restored mid-epoch: onto this module's device
            self._loss_sum = self._loss_sum.to(self.device)

    def _check_finite(self):
        if not torch.isfinite(self._loss_sum):  # a sum that is nan/inf means some step's loss was
            raise TrainingDiverged(
                f"train/loss became {self._loss_sum.item()} at step {self.global_step} (epoch {self.current_epoch},"
                f" checked every trainer.log_every_n_steps); try a lower optimizer.lr or trainer.gradient_clip_val=1.0"
            )

    def training_step(self, batch, batch_idx):
        out = self(batch)
        # The epoch mean accumulates on the device; the step value is logged (and divergence checked) only on
        # the logger's cadence: self.log every step costs ~5% of a small model's step, and each check a sync.
        self._loss_sum += out["loss"].detach()
        self._loss_steps += 1
        every = self.trainer.log_every_n_steps
        if every and (self.global_step + 1) % every == 0:
            self._check_finite()
            self.log("train/loss_step", out["loss"], on_step=True, on_epoch=False, prog_bar=True, sync_dist=True)
        if self.l2_sp > 0:
            penalty = self.l2_sp_penalty()
            self.log("train/l2_sp", penalty, on_step=False, on_epoch=True, sync_dist=True)  # equal on every rank
            return out["loss"] + penalty
        return out["loss"]

    def on_train_epoch_end(self):
        if self._loss_steps:
            self._check_finite()
            self.log(
                "train/loss_epoch", self._loss_sum / self._loss_steps, on_epoch=True, prog_bar=True, sync_dist=True
            )

    def _eval_step(self, batch, split: str, metrics):
        out = self(batch)
        self.log(
            f"{split}/loss",
            out["loss"],
            on_epoch=True,
            prog_bar=split == "val",
            batch_size=len(next(iter(batch.values()))),
            sync_dist=True,
        )
        if metrics is not None:
            self.objective.update_metrics(metrics, out)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val", self.val_metrics)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test", self.test_metrics)

    def _log_metrics(self, metrics):
        # Computed once per epoch from accumulated state: no per-step metric syncs. torchmetrics gathers
        # the states of all ranks in compute(), so the values are already global and equal on every rank;
        # sync_dist averages equal values (a no-op) and keeps Lightning from warning that it is missing.
        if metrics is not None:
            self.log_dict(metrics.compute(), prog_bar=True, sync_dist=True)
            metrics.reset()

    def on_validation_epoch_end(self):
        self._log_metrics(self.val_metrics)
        if self.scheduler_cfg.get("name") == "plateau" and not self.trainer.sanity_checking:
            value = self.trainer.callback_metrics.get(self.scheduler_cfg["monitor"])
            if value is not None:
                for config in self.trainer.lr_scheduler_configs:
                    config.scheduler.report(float(value))
                refresh_lrs(self.trainer)

    def on_test_epoch_end(self):
        self._log_metrics(self.test_metrics)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.optimizer_cfg, self.backbone, self.objective)
        total = int(self.trainer.estimated_stepping_batches)
        per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        scheduler = build_scheduler(self.scheduler_cfg, optimizer, total, per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
