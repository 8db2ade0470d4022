"""One pre-training or fine-tuning run: compose the pieces, fit, test, export, record.

``run(cfg)`` is what ``scripts/pretrain.py`` and ``scripts/finetune.py`` call (through
``cli.main``) and what the transfer study calls in-process for each of its runs.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.accelerators import CPUAccelerator
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_modules.backbones.artifacts import record_use
from lightning_modules.backbones.factory import build_backbone
from lightning_modules.backbones.handoff import resolve_init, state_differences
from lightning_modules.callbacks.export import BackboneExport
from lightning_modules.callbacks.feature_cache import FeatureCache
from lightning_modules.callbacks.forgetting import ForgettingProbe
from lightning_modules.callbacks.monitor import LayerGroupMonitor, count_params
from lightning_modules.callbacks.progress import ThrottledProgressBar
from lightning_modules.callbacks.seeding import EpochSeed
from lightning_modules.config.library import blamed_on, build
from lightning_modules.config.modalities import choice_name, pretrain_only, tower_errors, towers_of
from lightning_modules.config.rules import check
from lightning_modules.core.errors import ConfigError
from lightning_modules.core.results import is_rank_zero, write_atomic, write_metrics
from lightning_modules.objectives.base import build_objective
from lightning_modules.runtime import wandb_runs
from lightning_modules.runtime.cuda_check import runtime_cuda_check
from lightning_modules.runtime.preflight import check_fits, check_launcher, check_monitored
from lightning_modules.training.module import PretuneModule

# Options for torch.compile when model.compile=true (tests use a backend that skips code generation).
COMPILE_OPTIONS: dict = {}

# Lightning's own deprecation noise, nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def _final_metrics(trainer: pl.Trainer) -> dict:
    out = {}
    for key, value in trainer.callback_metrics.items():
        if key.endswith("_step"):
            continue
        out[key.removesuffix("_epoch")] = float(value)
    return out


def _loggers(cfg: DictConfig, out_dir: Path) -> list:
    loggers = []
    for name, conf in (cfg.get("logger") or {}).items():
        if conf is None:
            continue
        if name == "wandb" and conf.get("offline") is None:  # offline unless a W&B key is configured
            conf = OmegaConf.merge(conf, {"offline": wandb_runs.offline_default()})
        loggers.append(build(conf, f"logger.{name}"))
    return loggers


def _wandb_runs(trainer: pl.Trainer) -> list:
    """The W&B run objects of this process's loggers (rank 0 only: other ranks log nothing)."""
    if not trainer.is_global_zero:
        return []
    return [logger.experiment for logger in trainer.loggers if type(logger).__name__ == "WandbLogger"]


def parallel_jobs() -> int:
    """How many jobs share this machine: hydra/launcher=joblib's n_jobs (joblib's meaning: -1 all
    cores, -2 all but one, ...), else 1."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return 1
    launcher = HydraConfig.get().launcher
    if not str(launcher.get("_target_", "")).endswith("JoblibLauncher"):
        return 1
    cores, n_jobs = os.cpu_count() or 1, int(launcher.get("n_jobs") or 1)
    return max(1, min(cores, n_jobs if n_jobs > 0 else cores + 1 + n_jobs))


def _progress_bar(cfg: DictConfig, callbacks: list) -> list:
    """The default bar (``ThrottledProgressBar``: tqdm, redrawn at most 10 times a second from the training
    thread), unless the bar is off or a bar is configured among the callbacks."""
    from pytorch_lightning.callbacks import ProgressBar

    if not cfg.trainer.get("enable_progress_bar", True) or any(isinstance(c, ProgressBar) for c in callbacks):
        return []
    return [ThrottledProgressBar()]


def matmul_precision(cfg: DictConfig) -> str:
    """``float32_matmul_precision``: ``auto`` is ``high`` (float32 matmuls on TF32 tensor cores, as Lightning
    suggests) when the run trains on a CUDA GPU, else ``highest`` (torch's default: the CPU is left alone)."""
    choice = check("float32_matmul_precision", cfg.get("float32_matmul_precision", "auto"))
    if choice != "auto":
        return choice
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    on_gpu = accelerator in ("gpu", "cuda") or accelerator == "auto" and torch.cuda.is_available()
    return "high" if on_gpu else "highest"


def run(cfg: DictConfig) -> dict:
    """Every rank of a DDP run executes this; only global rank 0 writes the run's files (config.yaml,
    metrics.json, backbone/; Lightning already saves checkpoints and logs from rank 0 only)."""
    jobs = parallel_jobs()
    if jobs > 1:  # parallel jobs split the cores instead of each taking all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))
    out_dir = Path(cfg.paths.output_dir)
    if is_rank_zero():
        out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        with open_dict(cfg):  # recorded with the config: which weights, by path and hash (and artifact)
            cfg.model.source = resolve_init(str(cfg.model.get("init", "none")))
            cfg.float32_matmul_precision = matmul_precision(cfg)  # what "auto" became
            for name, tower in towers_of(cfg.model).items():  # a dual encoder's towers: each from its own init
                with tower_errors(name, tower):
                    tower.source = resolve_init(str(tower.init))
            if OmegaConf.select(cfg, "logger.wandb") is not None:  # unset name/group come from the Hydra job
                identity = wandb_runs.run_identity(Path(cfg.paths.log_dir), out_dir)
                cfg.logger.wandb.merge_with({k: v for k, v in identity.items() if cfg.logger.wandb.get(k) is None})
        if is_rank_zero():
            write_atomic(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        return _run(cfg, out_dir, started)
    except BaseException as err:
        if is_rank_zero():
            write_metrics(
                out_dir,
                {"status": "failed", "stage": cfg.stage, "error": f"{type(err).__name__}: {err}".splitlines()[0]},
            )
        raise


def _run(cfg: DictConfig, out_dir: Path, started: float) -> dict:
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    finetune = cfg.stage == "finetune"
    datamodule = build(cfg.datamodule, "datamodule", labeled=finetune)
    backbone = build_backbone(OmegaConf.to_container(cfg.model, resolve=True), data=datamodule)
    datamodule.use_backbone(backbone)
    datamodule.setup("fit")
    check_fits(backbone, datamodule)
    _record_loading(cfg, out_dir, datamodule)
    objective = build_objective(cfg.objective, backbone, datamodule.spec)
    if finetune and objective.pretrain_only:  # the config check refuses it where it can read the class
        raise ConfigError(pretrain_only(choice_name(cfg, "objective")))
    check_monitored(cfg, objective)
    module = PretuneModule(
        backbone,
        objective,
        OmegaConf.to_container(cfg.optimizer, resolve=True),
        OmegaConf.to_container(cfg.scheduler, resolve=True),
        l2_sp=OmegaConf.select(cfg, "finetune.l2_sp", default=0.0) or 0.0,
        channels_last=cfg.model.get("channels_last", "auto"),
    )
    if cfg.model.get("compile"):  # torch.compile of forward (backbone + objective's loss); weights stay as they are
        module.compile_forward(**COMPILE_OPTIONS)

    configured = _configured(cfg)
    callbacks = _callbacks(cfg, out_dir, backbone, datamodule, objective, configured)
    loggers = _loggers(cfg, out_dir)
    # Checkpoints are what the callbacks config says (callbacks=none: none), not a checkpoint Lightning adds.
    checkpoints = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    trainer: pl.Trainer = build(
        cfg.trainer,
        "trainer",
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(out_dir),
        enable_checkpointing=checkpoints,
    )
    check_launcher(cfg, trainer)
    for logger in trainer.loggers:  # the resolved config is every logger's run config
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        for experiment in _wandb_runs(trainer):
            record_use(experiment, str(cfg.model.get("init", "none")))
        # A configured callback refusing this run mid-way (EarlyStopping's metric never logged): one line.
        with runtime_cuda_check(enabled=isinstance(trainer.accelerator, CPUAccelerator)), blamed_on(configured):
            metrics = _fit_and_test(cfg, trainer, module, datamodule, out_dir)
        metrics["time/run_s"] = round(time.time() - started, 2)
        for experiment in _wandb_runs(trainer):
            experiment.summary.update(metrics)
    finally:
        _finish(loggers)
        if hasattr(trainer.strategy, "close"):  # DDP/FSDP (lightning_modules/runtime/parallel.py): end this job's ranks
            trainer.strategy.close(failed=sys.exc_info()[0] is not None)
    if trainer.is_global_zero:
        write_metrics(out_dir, metrics)
    return metrics


def _configured(cfg: DictConfig) -> dict:
    """``callbacks.<name>`` -> (the callback the config describes, its values)."""
    nodes = {name: c for name, c in (cfg.get("callbacks") or {}).items() if c is not None}
    return {
        f"callbacks.{name}": (build(c, f"callbacks.{name}"), OmegaConf.to_container(c, resolve=True))
        for name, c in nodes.items()
    }


def _record_loading(cfg: DictConfig, out_dir: Path, datamodule) -> None:
    """Which path the data took (held in memory or streamed, ``datamodules/loading/decision.py``): printed once and
    recorded in config.yaml as ``datamodule.loaded``."""
    loading = getattr(datamodule, "loading", None)
    if loading is None:
        return
    with open_dict(cfg):
        cfg.datamodule.loaded = loading.path
    if is_rank_zero():
        print(f"data: {loading.reason}", flush=True)
        write_atomic(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def _callbacks(cfg: DictConfig, out_dir: Path, backbone, datamodule, objective, configured: dict) -> list:
    """The configured callbacks, then what the stage adds: per-epoch seeding, the freezing strategy (fine-tuning,
    and pre-training too: e.g. a locked CLIP tower) and the per-group monitor, the feature cache (a backbone
    frozen throughout); when fine-tuning the forgetting probe; when pre-training the backbone export."""
    callbacks = [callback for callback, _values in configured.values()]
    callbacks.append(EpochSeed(cfg.seed))
    if cfg.get("freeze") is not None:
        freezer = build(cfg.freeze, "freeze")
        freezer.validate(backbone)  # e.g. freeze.layers beyond the backbone's groups: fail before training
        callbacks += [freezer, LayerGroupMonitor()]
        epochs = cfg.trainer.get("max_epochs") or 0
        if OmegaConf.select(cfg, "finetune.cache_features", default=False) and epochs > 0:
            if FeatureCache.reason_not(freezer, backbone, datamodule, objective, epochs) is None:
                callbacks.append(FeatureCache())
    if cfg.stage == "finetune":
        if OmegaConf.select(cfg, "finetune.measure_forgetting", default=False):
            callbacks.append(ForgettingProbe(str(cfg.model.init), cfg.model.source, backbone, datamodule))
    else:
        callbacks.append(BackboneExport(cfg, out_dir))
    return callbacks + _progress_bar(cfg, callbacks)


def _resume_path(cfg: DictConfig, module) -> str | None:
    """``ckpt_path``, checked: it must exist, hold only plain weights, and fit this config's model.
    Checkpoints are loaded with ``weights_only=True``, so a pickle that would run code is refused,
    never executed."""
    path = cfg.get("ckpt_path")
    if path is None:
        return None
    if str(path) == "last":  # this run dir's own last.ckpt: a relaunch (or a SLURM requeue) continues
        path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        if not path.is_file():
            return None  # nothing saved yet: this is the first attempt
    elif Path(path).is_dir():  # a run dir: its last checkpoint
        path = Path(path) / "checkpoints" / "last.ckpt"
    if not Path(path).is_file():
        raise ConfigError(f"ckpt_path={path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # UnpicklingError for unsafe content, RuntimeError/EOFError for corrupt files
        raise ConfigError(
            f"ckpt_path={path}: refused, not a plain-weights Lightning checkpoint ({type(err).__name__}:"
            f" {str(err).splitlines()[0][:200] if str(err) else ''})"
        ) from err
    differences = state_differences(module.state_dict(), checkpoint.get("state_dict", {}))
    if differences:
        raise ConfigError(f"ckpt_path={path}: the checkpoint is from another model config ({differences})")
    return str(path)


def _finish(loggers: list) -> None:
    """Close W&B runs explicitly, so jobs of one process (sweeps, the study) never merge into one run."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger" and logger._experiment is not None:
            logger.experiment.finish()


def _compile_seconds() -> float:
    """Seconds torch.compile has spent in this process so far (forward and backward graphs)."""
    from torch._dynamo.utils import calculate_time_spent

    return calculate_time_spent().get("total_wall_time", 0.0)


def _fit_and_test(cfg: DictConfig, trainer: pl.Trainer, module, datamodule, out_dir: Path) -> dict:
    compiling = module.compiled and _compile_seconds()
    trainer.fit(module, datamodule=datamodule, ckpt_path=_resume_path(cfg, module), weights_only=True)
    metrics = {
        "status": "ok",
        "stage": cfg.stage,
        **_final_metrics(trainer),
        **count_params(module),
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "threads": torch.get_num_threads(),  # torch threads this job trained with (joblib splits the cores)
    }
    if module.compiled:  # compilation, apart from the training it delays
        metrics["time/compile_s"] = round(_compile_seconds() - compiling, 2)
    if getattr(datamodule, "placement", None):
        metrics["data/placement"] = datamodule.placement  # cpu, device or pinned (datamodules/loading/in_memory.py)
    checkpoint = trainer.checkpoint_callback
    best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
    if best:
        metrics["best_checkpoint"] = os.path.relpath(best, out_dir)
        if checkpoint.best_model_score is not None:  # a monitored checkpoint
            metrics[f"{cfg.optimized_metric}_best"] = float(checkpoint.best_model_score)
    if cfg.stage == "finetune":
        # Test the checkpoint that validation selected, not whatever the last epoch left.
        tested = trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False, weights_only=True)
        metrics.update({k: float(v) for k, v in (tested[0] if tested else {}).items()})  # none: limit_test_batches=0
    # What callbacks measured (the forgetting probe, the group monitor) and the data counted (skipped samples).
    for source in [*trainer.callbacks, datamodule]:
        if hasattr(source, "run_metrics"):
            metrics.update(source.run_metrics())
    return metrics
