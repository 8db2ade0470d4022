"""Checks that need the built pieces, made before the first training step: a model that does not take the
data, a metric nothing logs, processes nobody starts. Each would otherwise fail (or hang) only once training
ran; here each is one line naming the key (``runtime/run.py`` calls them as it builds the run).
"""

from __future__ import annotations

import os

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from lightning_modules.core.errors import ConfigError, message_of, show


def check_monitored(monitored: dict, objective) -> None:
    """``optimized_metric`` (what checkpoints and sweeps select on), the plateau schedule's ``monitor`` and
    the callbacks' (``monitored``: key -> the metric it names, or None) must be metrics this run logs: otherwise
    Lightning would fail after the first epoch."""
    metrics = objective.make_metrics("val/")
    validation = ["val/loss", *(metrics.keys(keep_base=False) if metrics is not None else [])]
    for key, metric in monitored.items():
        logged = [*validation, "train/loss_epoch", "train/loss_step"] if key.startswith("callbacks.") else validation
        if metric is not None and metric not in logged:
            raise ConfigError(f"{key}={metric} is not logged by this run: allowed is one of {', '.join(logged)}")


def check_launcher(trainer_cfg, trainer: pl.Trainer) -> None:
    """Several processes on one machine need trainer=ddp or trainer=fsdp, whose ranks re-run this Hydra job in
    its run dir (runtime/parallel.py). Lightning's own launcher (what ``trainer.devices=2`` alone gets) would
    re-run the command line: new run dirs, and inside another program (the study, a test) that program.
    Several nodes need someone to start the others (SLURM, torchrun, or by hand with MASTER_ADDR): else this
    process would wait for them forever."""
    from lightning_fabric.plugins.environments import LightningEnvironment
    from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    environment = getattr(trainer.strategy, "cluster_environment", None)
    if trainer.num_nodes > 1 and type(environment) is LightningEnvironment and "MASTER_ADDR" not in os.environ:
        raise ConfigError(
            f"trainer.num_nodes={trainer.num_nodes}: nothing starts the other nodes (no SLURM, no torchrun, no"
            " MASTER_ADDR/NODE_RANK set by hand, see docs/scaling-out.md), so this process would wait for them"
        )
    if trainer.num_nodes > 1 and type(environment) is LightningEnvironment:  # started by hand: all three, on each
        missing = [var for var in ("MASTER_PORT", "NODE_RANK") if var not in os.environ]
        if missing:
            raise ConfigError(
                f"trainer.num_nodes={trainer.num_nodes} with MASTER_ADDR set by hand also needs {' and '.join(missing)}"
                " set on every node (the same MASTER_PORT, NODE_RANK 0.."
                f"{trainer.num_nodes - 1}): otherwise each node picks its own port or calls itself node 0"
            )

    launcher = getattr(trainer.strategy, "launcher", None)
    if type(launcher) is _SubprocessScriptLauncher and launcher.num_processes > 1:  # children started here
        keys = ", ".join(f"trainer.{k}={show(OmegaConf.select(trainer_cfg, k))}" for k in ("devices", "num_nodes"))
        raise ConfigError(
            f"{keys}: {launcher.num_processes} processes need trainer=ddp (or trainer=fsdp), whose ranks re-run this"
            " job in its own run dir; e.g. trainer=ddp trainer.devices=2"
        )


def check_fits(backbone, datamodule) -> None:
    """Two validation examples through the backbone, before training: a model that does not take the data
    (model.kwargs overriding its image size or channels, a patch size that does not divide the image, images
    too small for the network) fails here in one line, not in the first training step. Eval mode and no
    gradient: nothing changes, no random number is drawn."""
    batch = next(iter(datamodule.eval_loader("val", batch_size=2, sharded=False)))
    batch = datamodule.on_after_batch_transfer(batch, 0)  # as the model gets it (streamed images: normalised)
    inputs = ", ".join(f"{k} {'x'.join(map(str, v.shape[1:]))}" for k, v in batch.items() if k != "label")
    training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            backbone(batch)
    except Exception as err:
        model = ", ".join(f"model.{k}={show(v)}" for k, v in backbone.spec.items() if k != "type")
        raise ConfigError(f"{model}: the model does not take this data ({inputs}): {message_of(err)}") from err
    finally:
        backbone.train(training)
