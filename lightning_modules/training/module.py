"""The LightningModule shared by pre-training and fine-tuning: a backbone plus an objective.

The objective decides the loss and the metrics; this module only wires them to Lightning's
loops, the optimizer and the schedule.

On a GPU the training step never waits for the device. The host runs ahead, queueing work; a value read on
the host (``.item()``, ``if tensor``, a tensor converted for the progress bar) drains that queue and leaves the
GPU idle while Python prepares the next step. So the loss is accumulated on the device, and on the logging
cadence the step's loss and the running sum are copied to pinned host memory without blocking and read a few
steps later, when the copy has landed (``HostReports``): logged to the loggers under the step they belong to,
shown on the progress bar, and checked for divergence there. The progress bar is only ever handed host values
(Lightning converts every progress-bar tensor to a number after every batch: with a device tensor that is one
sync per step). On the CPU the copy is immediate, so everything happens at the step itself, as before.
"""

from __future__ import annotations

import math
from collections import deque

import pytorch_lightning as pl
import torch

from lightning_modules.config.rules import check
from lightning_modules.core.distributed import mean_over_ranks
from lightning_modules.core.errors import TrainingDiverged
from lightning_modules.core.progress import resuming_mid_epoch
from lightning_modules.training.optim import build_optimizer, build_scheduler, refresh_lrs


class HostReports:
    """Small device tensors read on the host without waiting: ``send`` queues a non-blocking copy into pinned
    memory; ``ready`` returns those whose copies have finished (all of them, waiting, with ``wait=True``)."""

    def __init__(self):
        self.pending: deque = deque()

    def send(self, values: torch.Tensor, tag) -> None:
        if values.is_cuda:
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host, done = values.detach().clone(), None
        self.pending.append((tag, host, done))

    def ready(self, wait: bool = False) -> list:
        out = []
        while self.pending:
            tag, host, done = self.pending[0]
            if done is not None and not done.query():
                if not wait:
                    break
                done.synchronize()
            self.pending.popleft()
            out.append((tag, host.tolist()))
        return out


def is_convolutional(model: torch.nn.Module) -> bool:
    """A CNN, as opposed to a ViT, whose only convolution is its patch embedding."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 1


def use_channels_last(choice, model: torch.nn.Module, device: torch.device) -> bool:
    """``model.channels_last``: ``auto`` is on for convolutional backbones on CUDA (cuDNN's NHWC kernels are
    faster there, tensor cores in particular) and off elsewhere (the CPU keeps its results as they were)."""
    if check("model.channels_last", choice) == "auto":
        return device.type == "cuda" and is_convolutional(model)
    return bool(choice)


class PretuneModule(pl.LightningModule):
    def __init__(self, backbone, objective, optimizer: dict, scheduler: dict, l2_sp: float = 0.0, channels_last="auto"):
        super().__init__()
        self.backbone, self.objective = backbone, objective
        self.l2_sp = float(l2_sp)
        self.channels_last_choice = check("model.channels_last", channels_last)
        self.channels_last = False  # resolved for the trainer's device in setup()
        self._reports = HostReports()
        # L2-SP pulls towards the weights the backbone starts from (the pre-trained ones), not towards 0.
        # Non-persistent buffers: they follow the module's device but stay out of checkpoints, since a
        # resumed run rebuilds them from model.init, as it started.
        self._anchor_names = []
        if self.l2_sp > 0:
            for i, (name, p) in enumerate(backbone.named_parameters()):
                self.register_buffer(f"_l2sp_anchor_{i}", p.detach().clone(), persistent=False)
                self._anchor_names.append(name)
        self.optimizer_cfg, self.scheduler_cfg = dict(optimizer), dict(scheduler)
        self._total_steps = 1  # the run's optimizer steps, set by configure_optimizers
        self.val_metrics = objective.make_metrics("val/")
        self.test_metrics = objective.make_metrics("test/")

    def compile_forward(self, **options) -> None:
        """``torch.compile`` the forward (backbone + objective, loss included), so that a run pays each graph once.

        Dynamo compiles one graph per combination of what its guards check: train or eval mode, which
        parameters require grad, the input shapes. So: the train and the eval graph are each compiled once and
        kept (an epoch after the first compiles nothing); evaluation batches have a dynamic batch dimension, so
        a short last batch (or another split's) reuses the eval graph; a freezing strategy that changes the frozen
        groups (gradual, LP-FT) changes the backward graph, which is compiled once when that configuration first
        appears; and the recompile limit is raised to hold every configuration (at dynamo's default of 8, gradual
        unfreezing of a 5-group backbone would silently fall back to eager). Dynamo's caches are reset first: an
        earlier run in this process (the transfer study, a sweep) would otherwise count against the limit."""
        import torch._dynamo

        torch._dynamo.reset()
        configurations = len(self.backbone.layer_groups()) + 2  # 0..G frozen groups, and a spare
        limit = max(torch._dynamo.config.recompile_limit, 2 * configurations + 4)  # train + eval each
        torch._dynamo.config.recompile_limit = limit
        self.compile(**options)

    @property
    def compiled(self) -> bool:
        return getattr(self, "_compiled_call_impl", None) is not None

    def configure_model(self) -> None:
        # trainer=fsdp: the strategy shards the module here, on every rank, where Lightning expects it
        # (runtime/parallel.py: one FSDP unit per layer group); other strategies have no ``shard``.
        shard = getattr(self.trainer.strategy, "shard", None)
        if shard is not None:
            shard(self)

    def setup(self, stage: str) -> None:
        # Before Lightning moves the module to its device; the optimizer's state follows the parameters' layout.
        self.channels_last = use_channels_last(
            self.channels_last_choice, self.backbone, self.trainer.strategy.root_device
        )
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)

    def forward(self, batch):
        if self.channels_last and batch.get("image") is not None and batch["image"].ndim == 4:
            batch = dict(batch, image=batch["image"].contiguous(memory_format=torch.channels_last))
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

    def on_train_start(self):
        restored, self._restored_loss = getattr(self, "_restored_loss", None), None
        if restored is not None and resuming_mid_epoch(self.trainer):  # the epoch's running sum so far
            self._loss_sum, self._loss_steps = restored["sum"].to(self.device), int(restored["steps"])

    # A checkpoint taken mid-epoch carries the epoch's running loss sum, so train/loss_epoch of a resumed epoch is
    # the mean over all of its steps, as in the uninterrupted run.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if hasattr(self, "_loss_sum"):
            checkpoint["pretune_epoch_loss"] = {"sum": self._loss_sum.detach().cpu(), "steps": self._loss_steps}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._restored_loss = checkpoint.get("pretune_epoch_loss")

    def _check_finite(self, loss_sum: float, step: int):
        if not math.isfinite(loss_sum):  # a sum that is nan/inf means some step's loss was
            raise TrainingDiverged(
                f"train/loss became {loss_sum} at step {step} (epoch {self.current_epoch},"
                f" checked every trainer.log_every_n_steps); try a lower optimizer.lr or trainer.gradient_clip_val=1.0"
            )

    def training_step(self, batch, batch_idx):
        self.objective.progress = (self.global_step, self._total_steps)
        out = self(batch)
        loss = out["loss"].detach()
        # The epoch mean accumulates on the device; the step value is logged (and divergence checked) only on
        # the logger's cadence: self.log every step costs ~5% of a small model's step. Neither waits for a GPU.
        self._loss_sum += loss
        self._loss_steps += 1
        every = self.trainer.log_every_n_steps
        if every and (self.global_step + 1) % every == 0:
            step = self.trainer.fit_loop.epoch_loop._batches_that_stepped  # the step Lightning's own logging uses
            values = mean_over_ranks(torch.stack([self._loss_sum, loss]))  # what sync_dist=True logged, on the device
            self._reports.send(values, (step, self.current_epoch))
        # Under DDP Lightning already syncs every step (its SIGTERM broadcast): wait, so every rank reads (and stops
        # on a divergence) at the same step.
        self._read_reports(wait=self.trainer.world_size > 1)
        if self.l2_sp > 0:
            penalty = self.l2_sp_penalty()
            self.log("train/l2_sp", penalty, on_step=False, on_epoch=True, sync_dist=True)  # equal on every rank
            return out["loss"] + penalty
        return out["loss"]

    def _read_reports(self, wait: bool = False, in_step: bool = True) -> None:
        """Log (under the step they were taken at) and check the reports whose copies have reached the host."""
        for (step, epoch), (loss_sum, step_loss) in self._reports.ready(wait):
            self._check_finite(loss_sum, step)
            for logger in self.trainer.loggers:
                logger.log_metrics({"train/loss_step": step_loss, "epoch": epoch}, step=step)
                logger.save()
            if in_step:  # the bar shows the latest value that arrived, a host number: no sync at each redraw
                self.log("train/loss_step", torch.tensor(step_loss), prog_bar=True, logger=False)

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # Right after the update (CLIP's logit scale clamped, an EMA teacher moved), before any callback sees the
        # step: a checkpoint taken at it holds what the step made. Once per optimizer step, however many batches
        # it accumulated.
        self.objective.after_step(self.backbone)

    def on_train_epoch_end(self):
        self._read_reports(wait=True, in_step=False)
        if self._loss_steps:
            loss_sum = self._loss_sum.item()  # once an epoch
            self._check_finite(loss_sum, self.global_step)
            self.log(
                "train/loss_epoch", self._loss_sum / self._loss_steps, on_epoch=True, prog_bar=True, sync_dist=True
            )

    def _eval_step(self, batch, split: str, metrics):
        if self.compiled:  # one eval graph for every batch size (a short last batch, another split)
            for value in batch.values():
                torch._dynamo.maybe_mark_dynamic(value, 0)
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
        self._total_steps = total  # the objective's schedules read it (progress)
        per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        scheduler = build_scheduler(self.scheduler_cfg, optimizer, total, per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
