"""One pre-training or fine-tuning run: compose the pieces, fit, test, export, record.

``run(cfg)`` is what ``scripts/pretrain.py`` and ``scripts/finetune.py`` call (through ``cli.main``) and what the
transfer study calls in-process for each of its runs. It is the one place that reads the whole config: each piece
gets its own node (the datamodule ``cfg.datamodule``, the backbone factory ``cfg.model``, the trainer
``cfg.trainer`` ...) or objects already built. ``config.yaml`` is written once, as composed; what the run resolves
on the way (where the weights came from and their sha256, what ``float32_matmul_precision=auto`` became, which
path the data took, the W&B run's name and group) is its run record, ``run.json`` beside it
(``core/results.py``).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.accelerators import CPUAccelerator
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_modules.backbones.artifacts import artifact_name, model_artifact_name, record_use
from lightning_modules.backbones.factory import build_backbone
from lightning_modules.backbones.handoff import provenance_of, resolve_init, state_differences
from lightning_modules.backbones.model_dir import MODEL_DIR
from lightning_modules.callbacks.export import BackboneExport
from lightning_modules.callbacks.feature_cache import FeatureCache
from lightning_modules.callbacks.forgetting import ForgettingProbe
from lightning_modules.callbacks.model_export import ModelExport
from lightning_modules.callbacks.monitor import LayerGroupMonitor, count_params
from lightning_modules.callbacks.preemption import Requeue, requeued_job
from lightning_modules.callbacks.progress import ThrottledProgressBar
from lightning_modules.callbacks.seeding import EpochSeed
from lightning_modules.config.library import blamed_on, build
from lightning_modules.config.modalities import choice_name, pretrain_only, tower_errors, towers_of
from lightning_modules.config.rules import check
from lightning_modules.core.cores import cores, threads_per_job
from lightning_modules.core.errors import ConfigError, Requeued
from lightning_modules.core.results import is_rank_zero, write_atomic, write_metrics, write_run_record
from lightning_modules.core.version import __version__
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


def loggers_from(logger_cfg, identity: dict | None = None) -> list:
    """The configured loggers (``cfg.logger``); ``identity``: the W&B run's name and group where the config leaves
    them unset (``wandb_runs.run_identity``), and its id (``wandb_runs.run_id``: a resumed run continues its W&B
    run). W&B is offline unless a key is configured."""
    loggers = []
    for name, conf in (logger_cfg or {}).items():
        if conf is None:
            continue
        extra = {}
        if name == "wandb":
            extra = {k: v for k, v in (identity or {}).items() if conf.get(k) is None}
            if conf.get("offline") is None:
                extra["offline"] = wandb_runs.offline_default()
            if "id" in extra and conf.get("resume") is None:  # the run record's id: a resumed run continues it
                extra["resume"] = "allow"
        loggers.append(build(conf, f"logger.{name}", **extra))
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
    available, n_jobs = cores(), int(launcher.get("n_jobs") or 1)
    return max(1, min(available, n_jobs if n_jobs > 0 else available + 1 + n_jobs))


def _progress_bar(enabled: bool, callbacks: list) -> list:
    """The default bar (``ThrottledProgressBar``: tqdm, redrawn at most 10 times a second from the training
    thread), unless the bar is off (``trainer.enable_progress_bar``) or a bar is configured among the callbacks."""
    from pytorch_lightning.callbacks import ProgressBar

    if not enabled or any(isinstance(c, ProgressBar) for c in callbacks):
        return []
    return [ThrottledProgressBar()]


def matmul_precision(choice: str, accelerator: str = "auto") -> str:
    """``float32_matmul_precision``: ``auto`` is ``high`` (float32 matmuls on TF32 tensor cores, as Lightning
    suggests) when the run trains on a CUDA GPU (``trainer.accelerator``), else ``highest`` (torch's default: the
    CPU is left alone)."""
    if check("float32_matmul_precision", choice) != "auto":
        return choice
    accelerator = str(accelerator)
    on_gpu = accelerator in ("gpu", "cuda") or accelerator == "auto" and torch.cuda.is_available()
    return "high" if on_gpu else "highest"


def resolve_sources(model_cfg) -> dict:
    """Where ``model.init`` (and a dual encoder's towers' own inits) take their weights from: the run record's
    ``weights`` (and ``towers``)."""
    record = {"weights": resolve_init(str(model_cfg.get("init", "none")))}
    towers = {}
    for name, tower in towers_of(model_cfg).items():  # a dual encoder's towers: each from its own init
        with tower_errors(name, tower):
            towers[name] = resolve_init(str(tower.get("init", "none")))
    return record | ({"towers": towers} if towers else {})


def run(cfg: DictConfig) -> dict:
    """Every rank of a DDP run executes this; only global rank 0 writes the run's files (config.yaml, run.json,
    metrics.json, backbone/; Lightning already saves checkpoints and logs from rank 0 only)."""
    jobs = parallel_jobs()
    if jobs > 1:  # parallel jobs split the cores instead of each taking all of them
        torch.set_num_threads(threads_per_job(jobs))
    out_dir = Path(cfg.paths.output_dir)
    if is_rank_zero():
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    started = time.time()
    try:
        return _run(cfg, out_dir, started)
    except BaseException as err:
        if is_rank_zero() and not isinstance(err, Requeued):  # a requeued job's run goes on: no result yet
            write_metrics(
                out_dir,
                {"status": "failed", "stage": cfg.stage, "error": f"{type(err).__name__}: {err}".splitlines()[0]},
            )
        raise


def _run(cfg: DictConfig, out_dir: Path, started: float) -> dict:
    finetune = cfg.stage == "finetune"
    init = str(cfg.model.get("init", "none"))  # a model config without one starts from scratch
    record = {
        "stage": cfg.stage,
        "pretune_version": __version__,  # the pretune that ran it (the loggers' config gets it too, under run)
        **resolve_sources(cfg.model),
        "float32_matmul_precision": matmul_precision(
            cfg.get("float32_matmul_precision", "auto"), cfg.trainer.get("accelerator", "auto")
        ),
    }
    checkpoint = _checkpoint_file(cfg.get("ckpt_path"), out_dir)
    if OmegaConf.select(cfg, "logger.wandb") is not None:  # unset name/group come from the Hydra job
        record["wandb"] = wandb_runs.run_identity(Path(cfg.paths.log_dir), out_dir)
        record["wandb"]["id"] = OmegaConf.select(cfg, "logger.wandb.id") or wandb_runs.run_id(
            out_dir, resuming=checkpoint is not None
        )
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision(record["float32_matmul_precision"])
    datamodule = build(cfg.datamodule, "datamodule", labeled=finetune)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    backbone = build_backbone(model_cfg, data=datamodule, source=record["weights"])
    datamodule.use_backbone(backbone)
    datamodule.setup("fit")
    check_fits(backbone, datamodule)
    if datamodule.describe():  # the loading path, the augmentation as resolved (transforms/recipe.py)
        record["data"] = datamodule.describe()
    loading = getattr(datamodule, "loading", None)  # which path the data took (datamodules/loading/decision.py)
    if loading is not None and is_rank_zero():
        print(f"data: {loading.reason}", flush=True)
    if is_rank_zero():
        write_run_record(out_dir, record)
    objective = build_objective(cfg.objective, backbone, datamodule.spec)
    if finetune and objective.pretrain_only:  # the config check refuses it where it can read the class
        raise ConfigError(pretrain_only(choice_name(cfg, "objective")))
    check_monitored(_monitored(cfg), objective)
    # Checked on the backbone before training; adapters (freeze=lora) go in before the module and its optimizer
    freezer = _freezer(cfg.get("freeze"), backbone)
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

    configured = _configured(cfg.get("callbacks"))
    callbacks = [callback for callback, _values in configured.values()]
    callbacks.append(EpochSeed(cfg.seed))
    callbacks.append(Requeue(out_dir / "checkpoints" / "last.ckpt"))  # under SLURM: save and requeue when signalled
    callbacks += _freezing(
        freezer,
        backbone,
        datamodule,
        objective,
        cfg.trainer.get("max_epochs") or 0,
        OmegaConf.select(cfg, "finetune.cache_features", default=False),
    )
    if finetune:
        if OmegaConf.select(cfg, "finetune.measure_forgetting", default=False):
            callbacks.append(ForgettingProbe(init, record["weights"], backbone, datamodule))
        if OmegaConf.select(cfg, "finetune.export_model", default=True):
            wandb_on = OmegaConf.select(cfg, "logger.wandb") is not None
            about = _model_card(cfg.datamodule, cfg.seed, out_dir, record["weights"])
            artifact = _model_artifact(model_cfg, datamodule, cfg.datamodule) if wandb_on else None
            callbacks.append(ModelExport(out_dir / MODEL_DIR, about, artifact, cfg.get("push_to_hub")))
    else:
        callbacks.append(_export(cfg, model_cfg, out_dir, datamodule.export_files()))
    callbacks += _progress_bar(cfg.trainer.get("enable_progress_bar", True), callbacks)
    loggers = loggers_from(cfg.get("logger"), record.get("wandb"))
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
    check_launcher(cfg.trainer, trainer)
    for logger in trainer.loggers:  # the resolved config and the run record are every logger's run config
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "run": record})
    try:
        for experiment in _wandb_runs(trainer):
            record_use(experiment, init, record["weights"])
        # A configured callback refusing this run mid-way (EarlyStopping's metric never logged): one line.
        with runtime_cuda_check(enabled=isinstance(trainer.accelerator, CPUAccelerator)), blamed_on(configured):
            resume = _checked_resume(checkpoint, module)
            metrics = _fit_and_test(trainer, module, datamodule, out_dir, cfg.stage, cfg.optimized_metric, resume)
        metrics["time/run_s"] = round(time.time() - started, 2)
        for experiment in _wandb_runs(trainer):
            experiment.summary.update(metrics)
    finally:
        finish(loggers)
        if hasattr(trainer.strategy, "close"):  # DDP/FSDP (lightning_modules/runtime/parallel.py): end this job's ranks
            trainer.strategy.close(failed=sys.exc_info()[0] is not None)
    if trainer.is_global_zero:
        write_metrics(out_dir, metrics)
    return metrics


def _monitored(cfg: DictConfig) -> dict:
    """Every metric the config asks a component to watch, by key: the optimized metric (checkpoints, sweeps), the
    plateau schedule's, each callback's ``monitor``."""
    keys = ["optimized_metric", "scheduler.monitor", *(f"callbacks.{n}.monitor" for n in cfg.get("callbacks") or {})]
    return {key: OmegaConf.select(cfg, key, default=None) for key in keys}


def _configured(callbacks_cfg) -> dict:
    """``callbacks.<name>`` -> (the callback the config describes, its values)."""
    nodes = {name: c for name, c in (callbacks_cfg or {}).items() if c is not None}
    return {
        f"callbacks.{name}": (build(c, f"callbacks.{name}"), OmegaConf.to_container(c, resolve=True))
        for name, c in nodes.items()
    }


def _freezer(freeze_cfg, backbone):
    """The freezing strategy (fine-tuning, and pre-training too: e.g. a locked CLIP tower), checked on the backbone
    (e.g. freeze.layers beyond its groups: fail before training) and given its chance to change it (adapters)."""
    if freeze_cfg is None:
        return None
    freezer = build(freeze_cfg, "freeze")
    freezer.validate(backbone)
    freezer.prepare(backbone)
    return freezer


def _freezing(freezer, backbone, datamodule, objective, epochs: int, cache_features: bool) -> list:
    """The freezing strategy and the per-group monitor; the feature cache when the backbone stays frozen
    throughout."""
    if freezer is None:
        return []
    callbacks = [freezer, LayerGroupMonitor()]
    if (
        cache_features
        and epochs > 0
        and FeatureCache.reason_not(freezer, backbone, datamodule, objective, epochs) is None
    ):
        callbacks.append(FeatureCache())
    return callbacks


def _export(cfg: DictConfig, model_cfg: dict, out_dir: Path, files: dict) -> BackboneExport:
    """The pre-training's ``backbone/`` export, with where it came from, the W&B artifact names of its parts
    (a dual encoder's towers too) and what the data leave next to it (``files``: the pairs' captions)."""
    objective = cfg.objective.get("_target_")
    provenance = {
        "objective": objective,
        "datamodule": cfg.datamodule.get("_target_"),
        "seed": cfg.seed,
        "run_dir": str(out_dir.resolve()),
    }
    names = {"": artifact_name(model_cfg, objective)}
    names |= {tower: artifact_name(model_cfg[tower], objective) for tower in towers_of(model_cfg)}
    if OmegaConf.select(cfg, "logger.wandb") is not None:  # a fine-tune from this backbone/ links to the artifact
        provenance["wandb_artifact"] = names[""]
    objective_cfg = OmegaConf.to_container(cfg.objective, resolve=True)
    return BackboneExport(out_dir / "backbone", provenance, objective_cfg, names, files)


def _model_card(data_cfg, seed: int, out_dir: Path, weights: dict | None) -> dict:
    """What a fine-tune's ``model/`` card says of where it came from: this run, its data, the weights it started
    from (the run record's ``weights``) and, for a pretune backbone, how that was pre-trained."""
    data = {k: data_cfg.get(k) for k in ("root", "path", "text_column", "label_column") if data_cfg.get(k) is not None}
    return {
        "run_dir": str(out_dir.resolve()),
        "data": {
            "datamodule": str(data_cfg.get("_target_", "")).rsplit(".", 1)[-1],
            **data,
            "label_fraction": data_cfg.get("label_fraction", 1.0),
            "seed": seed,
        },
        "pretrained": weights,
        "pretraining": _pretraining(weights),
    }


def _model_artifact(model_cfg: dict, datamodule, data_cfg) -> str:
    """The W&B name of a fine-tune's model artifact: the backbone's and the data's (its folder or file)."""
    name = getattr(datamodule, "name", type(datamodule).__name__)
    return model_artifact_name(model_cfg, name, data_cfg.get("root") or data_cfg.get("path"))


def _pretraining(weights: dict | None) -> dict | None:
    """How a pretune backbone the fine-tune started from was pre-trained (its objective and data), from its
    ``config.yaml``; None for other weights."""
    if not weights or not weights.get("path") or weights.get("file"):
        return None
    provenance = provenance_of(Path(weights["path"]))
    out = {k: str(provenance[k]).rsplit(".", 1)[-1] for k in ("objective", "datamodule") if k in provenance}
    return out | {k: provenance[k] for k in ("run_dir", "wandb_artifact") if k in provenance}


def _checkpoint_file(ckpt_path, out_dir: Path) -> Path | None:
    """The checkpoint ``ckpt_path`` names: a file, a run dir (its ``last.ckpt``), or ``last``, this run dir's own
    ``last.ckpt`` (None while there is none: the first attempt). A requeued SLURM job (``callbacks/preemption.py``)
    continues from its own ``last.ckpt`` once it has one, whatever ``ckpt_path`` it started from."""
    own = out_dir / "checkpoints" / "last.ckpt"
    if requeued_job() and own.is_file():
        return own
    path = ckpt_path
    if path is None:
        return None
    if str(path) == "last":  # this run dir's own last.ckpt: a relaunch continues
        return own if own.is_file() else None  # nothing saved yet: this is the first attempt
    if Path(path).is_dir():  # a run dir: its last checkpoint
        path = Path(path) / "checkpoints" / "last.ckpt"
    if not Path(path).is_file():
        raise ConfigError(f"ckpt_path={path}: no such checkpoint file")
    return Path(path)


def _checked_resume(path: Path | None, module) -> str | None:
    """The checkpoint to resume, checked: it must hold only plain weights, and fit this config's model.
    Checkpoints are loaded with ``weights_only=True``, so a pickle that would run code is refused,
    never executed."""
    if path is None:
        return None
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


def finish(loggers: list) -> None:
    """Close W&B runs explicitly, so jobs of one process (sweeps, the study) never merge into one run."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger" and logger._experiment is not None:
            logger.experiment.finish()


def _compile_seconds() -> float:
    """Seconds torch.compile has spent in this process so far (forward and backward graphs)."""
    from torch._dynamo.utils import calculate_time_spent

    return calculate_time_spent().get("total_wall_time", 0.0)


def _fit_and_test(trainer, module, datamodule, out_dir: Path, stage: str, optimized: str, resume) -> dict:
    compiling = module.compiled and _compile_seconds()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    metrics = {
        "status": "ok",
        "stage": stage,
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
            metrics[f"{optimized}_best"] = float(checkpoint.best_model_score)
    if stage == "finetune":
        # Test the checkpoint that validation selected, not whatever the last epoch left.
        tested = trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False, weights_only=True)
        metrics.update({k: float(v) for k, v in (tested[0] if tested else {}).items()})  # none: limit_test_batches=0
    # What callbacks measured (the forgetting probe, the group monitor) and the data counted (skipped samples).
    for source in [*trainer.callbacks, datamodule]:
        if hasattr(source, "run_metrics"):
            metrics.update(source.run_metrics())
    return metrics
