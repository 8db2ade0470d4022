"""One pre-training or fine-tuning run: compose the pieces, fit, test, export, record.

``run(cfg)`` is what ``scripts/pretrain.py`` and ``scripts/finetune.py`` call (through
``cli.main``) and what the transfer study calls in-process for each of its runs.
"""

from __future__ import annotations

import importlib.util
import os
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from datamodules.errors import ConfigError
from lightning_modules.forgetting import ForgettingProbe
from lightning_modules.handoff import build_backbone, export_backbone
from lightning_modules.module import PretuneModule
from lightning_modules.monitor import LayerGroupMonitor, count_params
from lightning_modules.results import write_atomic, write_metrics
from lightning_modules.seeding import EpochSeed

# Lightning's own deprecation noise, nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def _final_metrics(trainer: pl.Trainer) -> dict:
    out = {}
    for key, value in trainer.callback_metrics.items():
        if key.endswith("_step"):
            continue
        out[key.removesuffix("_epoch")] = float(value)
    return out


def _loggers(cfg: DictConfig) -> list:
    loggers = []
    for name, conf in (cfg.get("logger") or {}).items():
        if conf is None:
            continue
        if name == "wandb" and conf.get("offline") is None:
            from lightning_modules.wandb_mode import wandb_offline_default

            conf = OmegaConf.merge(conf, {"offline": wandb_offline_default()})
        loggers.append(instantiate(conf))
    return loggers


def _progress_bar(cfg: DictConfig, callbacks: list) -> list:
    """Lightning's own bar, redrawn at most 10 times a second (Rich) or every 10 steps (tqdm), not at 100 Hz or
    every step: on CPU that redrawing cost up to ~4% of a small model's step (scripts/benchmark.py). Not slower
    than 10 Hz: Lightning's Rich thread sleeps 1/rate between redraws, so stopping it at each stage's end waits
    up to that long (1 s at 1 Hz)."""
    from pytorch_lightning.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

    if not cfg.trainer.get("enable_progress_bar", True) or any(isinstance(c, ProgressBar) for c in callbacks):
        return []
    return [RichProgressBar(refresh_rate=10) if importlib.util.find_spec("rich") else TQDMProgressBar(refresh_rate=10)]


def run(cfg: DictConfig) -> dict:
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    started = time.time()
    try:
        return _run(cfg, out_dir, started)
    except BaseException as err:
        write_metrics(
            out_dir,
            {"status": "failed", "stage": cfg.stage, "error": f"{type(err).__name__}: {err}".splitlines()[0]},
        )
        raise


def _run(cfg: DictConfig, out_dir: Path, started: float) -> dict:
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    finetune = cfg.stage == "finetune"
    datamodule = instantiate(cfg.datamodule, labeled=finetune)
    datamodule.setup("fit")
    backbone = build_backbone(OmegaConf.to_container(cfg.model, resolve=True))
    objective = instantiate(cfg.objective, backbone=backbone, data=datamodule.spec)
    module = PretuneModule(
        backbone,
        objective,
        OmegaConf.to_container(cfg.optimizer, resolve=True),
        OmegaConf.to_container(cfg.scheduler, resolve=True),
        l2_sp=OmegaConf.select(cfg, "finetune.l2_sp", default=0.0) or 0.0,
    )
    if cfg.model.get("compile"):  # torch.compile of forward (backbone + objective's loss); weights stay as they are
        module.compile()

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks.append(EpochSeed(cfg.seed))
    if finetune:
        freezer = instantiate(cfg.freeze)
        freezer.validate(backbone)  # e.g. freeze.layers beyond the backbone's groups: fail before training
        callbacks += [freezer, LayerGroupMonitor()]
    callbacks += _progress_bar(cfg, callbacks)
    loggers = _loggers(cfg)
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=str(out_dir)
    )
    for logger in trainer.loggers:  # the resolved config is every logger's run config
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        metrics = _fit_and_test(cfg, trainer, module, datamodule, out_dir)
    finally:
        _finish(loggers)
    metrics["time/run_s"] = round(time.time() - started, 2)
    write_metrics(out_dir, metrics)
    return metrics


def _resume_path(cfg: DictConfig) -> str | None:
    """``ckpt_path``, checked: it must exist and hold only plain weights. Checkpoints are loaded with
    ``weights_only=True``, so a pickle that would run code is refused, never executed."""
    path = cfg.get("ckpt_path")
    if path is None:
        return None
    if not Path(path).is_file():
        raise ConfigError(f"ckpt_path={path}: no such checkpoint file")
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # UnpicklingError for unsafe content, RuntimeError/EOFError for corrupt files
        raise ConfigError(
            f"ckpt_path={path}: refused, not a plain-weights Lightning checkpoint ({type(err).__name__}:"
            f" {str(err).splitlines()[0][:200] if str(err) else ''})"
        ) from err
    return str(path)


def _finish(loggers: list) -> None:
    """Close W&B runs explicitly, so jobs of one process (sweeps, the study) never merge into one run."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger" and logger._experiment is not None:
            logger.experiment.finish()


def _fit_and_test(cfg: DictConfig, trainer: pl.Trainer, module, datamodule, out_dir: Path) -> dict:
    probe = None
    if OmegaConf.select(cfg, "finetune.measure_forgetting", default=False):
        probe = ForgettingProbe(str(cfg.model.init), module.backbone, datamodule)
        before = probe.loss(module.backbone)
    trainer.fit(module, datamodule=datamodule, ckpt_path=_resume_path(cfg), weights_only=True)
    metrics = {
        "status": "ok",
        "stage": cfg.stage,
        **_final_metrics(trainer),
        **count_params(module),
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
    }
    monitor = next((c for c in trainer.callbacks if isinstance(c, LayerGroupMonitor)), None)
    if monitor is not None and monitor.trainable_at_start is not None:
        metrics["params/trainable_start"] = monitor.trainable_at_start

    checkpoint = trainer.checkpoint_callback
    best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
    if best:
        metrics[f"{cfg.optimized_metric}_best"] = float(checkpoint.best_model_score)
        metrics["best_checkpoint"] = os.path.relpath(best, out_dir)
    if cfg.stage == "finetune":
        # Test the checkpoint that validation selected, not whatever the last epoch left.
        tested = trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False, weights_only=True)
        metrics.update({k: float(v) for k, v in tested[0].items()})
        if probe is not None:  # on the tested (best) weights
            after = probe.loss(module.backbone)
            metrics.update(
                {
                    "forgetting/pretrain_loss_before": before,
                    "forgetting/pretrain_loss_after": after,
                    "forgetting/increase": after - before,
                }
            )
    else:
        provenance = {
            "objective": cfg.objective.get("_target_"),
            "datamodule": cfg.datamodule.get("_target_"),
            "seed": cfg.seed,
            "run_dir": str(out_dir.resolve()),
        }
        export_backbone(
            module.backbone,
            out_dir / "backbone",
            provenance=provenance,
            objective=module.objective,
            objective_cfg=OmegaConf.to_container(cfg.objective, resolve=True),
        )
    return metrics
