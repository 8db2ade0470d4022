"""One evaluation of a pre-trained image–text model, without training it (``scripts/evaluate.py``):

- ``zero_shot``: classify a labeled image datamodule's split (``zero_shot.split``: test) with no label seen: each
  class name (the datamodule's, or ``zero_shot.class_names``) through the prompt templates, the prompts' embeddings
  averaged per class, each image given the nearest class. Logs ``zero_shot/acc`` (top-1) and ``zero_shot/f1``
  (macro), torchmetrics' as for a trained classifier. The templates (``prompt_templates``): ``zero_shot.templates``
  when set; else the datamodule's own (the digit datamodules'); else those the pre-training's captions were written
  with (``captions.json`` next to its backbone); else CLIP's generic photo prompts. ``metrics.json`` says which
  (``zero_shot/templates``, ``zero_shot/templates_from``).
- ``retrieval``: image→text and text→image recall@1/5/10 (and the CLIP loss) on an image–caption datamodule's
  validation pairs, as a pre-training run's validation computes them (``retrieval/i2t_recall@1`` ...).

``model.init`` is a CLIP pre-training run (or its ``backbone/``): its towers, and its projections and temperature
(``objective.safetensors``). The run writes ``outputs/evaluate/<timestamp>/`` (``config.yaml``, ``metrics.json``)
and logs the metrics to the configured logger (``logger=wandb``: a run of job type ``evaluate``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torchmetrics
from omegaconf import DictConfig, OmegaConf

from datamodules.sources.image_text import CAPTIONS_FILE
from datamodules.spec import ImageTextSpec
from lightning_modules.backbones.artifacts import record_use
from lightning_modules.backbones.factory import build_backbone
from lightning_modules.config.library import build
from lightning_modules.core.errors import ConfigError
from lightning_modules.core.results import is_rank_zero, write_atomic, write_metrics, write_run_record
from lightning_modules.core.version import __version__
from lightning_modules.objectives.base import saved_objective
from lightning_modules.objectives.clip import GENERIC_PROMPTS, templates_from_captions
from lightning_modules.runtime import wandb_runs
from lightning_modules.runtime.run import finish, loggers_from, resolve_sources


def evaluate(cfg: DictConfig) -> dict:
    """As ``run.run``: ``config.yaml`` written once, as composed; what was resolved in the run record (``run.json``);
    ``metrics.json`` at the end."""
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    started = time.time()
    try:
        record = {"stage": "evaluate", "pretune_version": __version__, **resolve_sources(cfg.model)}
        if OmegaConf.select(cfg, "logger.wandb") is not None:  # named and grouped as a run is
            record["wandb"] = wandb_runs.run_identity(Path(cfg.paths.log_dir), out_dir)
        write_run_record(out_dir, record)
        metrics = {"status": "ok", "stage": "evaluate", "task": cfg.task, **_evaluate(cfg, record["weights"])}
    except BaseException as err:
        if is_rank_zero():
            write_metrics(out_dir, {"status": "failed", "stage": "evaluate", "error": f"{type(err).__name__}: {err}"})
        raise
    metrics["time/run_s"] = round(time.time() - started, 2)
    loggers = loggers_from(cfg.get("logger"), record.get("wandb"))
    try:
        for logger in loggers:
            logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "run": record})
            logger.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)}, step=0)
            logger.save()
            if type(logger).__name__ == "WandbLogger":
                record_use(logger.experiment, str(cfg.model.init))  # lineage: which artifact it evaluated
                logger.experiment.summary.update(metrics)
    finally:
        finish(loggers)
    write_metrics(out_dir, metrics)
    return metrics


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _evaluate(cfg: DictConfig, source: dict | None) -> dict:
    pl.seed_everything(cfg.seed, verbose=False)
    task = cfg.task
    datamodule = build(cfg.datamodule, "datamodule", labeled=task == "zero_shot")
    backbone = build_backbone(OmegaConf.to_container(cfg.model, resolve=True), data=datamodule, source=source)
    datamodule.use_backbone(backbone)
    datamodule.setup("fit")
    text = backbone.towers()["text"]
    spec = datamodule.spec
    if not isinstance(spec, ImageTextSpec):  # the objective is built as in pre-training: on image–text data
        tok = text.processor
        spec = ImageTextSpec(spec.channels, spec.image_size, len(tok), text.max_positions, tok.pad_token_id, tok)
    objective = saved_objective(source, backbone, spec)
    if objective is None:
        raise ConfigError(
            f"model.init={cfg.model.init}: scripts/evaluate.py needs a CLIP pre-training run (or its backbone/): its"
            " towers, and the projections and temperature it saved (objective.safetensors)"
        )
    if not hasattr(objective, "class_embeddings"):
        raise ConfigError(f"model.init={cfg.model.init}: its objective ({type(objective).__name__}) is not CLIP")
    device = pick_device(str(cfg.get("device", "auto")))
    backbone.to(device).eval()
    objective.to(device).eval()
    with torch.no_grad():
        if task == "zero_shot":
            return _zero_shot(cfg.zero_shot, backbone, objective, datamodule, device, source)
        return _retrieval(cfg.retrieval, backbone, objective, datamodule, device)


def prompt_templates(conf, datamodule, source: dict | None, class_names: list[str]) -> tuple[list[str], str]:
    """The zero-shot prompts and where they come from (see the module's docstring)."""
    if conf.templates:
        return list(conf.templates), "zero_shot.templates"
    own = getattr(datamodule, "prompt_templates", None)
    if own:
        return list(own), f"datamodule={datamodule.name}"
    recorded = Path(source["path"]) / CAPTIONS_FILE if source and "path" in source else None
    if recorded is not None and recorded.is_file():
        derived = templates_from_captions(json.loads(recorded.read_text())["captions"], class_names)
        if derived:
            return derived, "the pre-training captions"
    return list(GENERIC_PROMPTS), "CLIP's generic photo prompts"


def _zero_shot(conf, backbone, objective, datamodule, device, source: dict | None) -> dict:
    class_names = list(conf.class_names or datamodule.spec.class_names)
    n = len(datamodule.spec.class_names)
    if len(class_names) != n:
        raise ConfigError(
            f"zero_shot.class_names has {len(class_names)} names, but the datamodule has {n} classes; allowed is"
            f" one name per class, in label order ({', '.join(datamodule.spec.class_names)})"
        )
    templates, origin = prompt_templates(conf, datamodule, source, class_names)
    classes = objective.class_embeddings(backbone, class_names, templates)
    metrics = torchmetrics.MetricCollection(
        {
            "acc": torchmetrics.classification.MulticlassAccuracy(n, average="micro"),
            "f1": torchmetrics.classification.MulticlassF1Score(n, average="macro"),
        },
        prefix="zero_shot/",
    ).to(device)
    images = 0
    for batch in datamodule.eval_loader(conf.split, conf.batch_size, sharded=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        metrics.update(objective.zero_shot_logits(backbone, batch, classes), batch["label"])
        images += len(batch["label"])
    out = {k: float(v) for k, v in metrics.compute().items()}
    described = {"zero_shot/templates": templates, "zero_shot/templates_from": origin}
    return out | {"zero_shot/classes": n, "zero_shot/images": images, "zero_shot/split": conf.split, **described}


def _retrieval(conf, backbone, objective, datamodule, device) -> dict:
    metrics = objective.make_metrics("retrieval/").to(device)
    total, count = 0.0, 0
    for batch in datamodule.eval_loader(conf.split, conf.batch_size, sharded=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        out = objective(backbone, batch)
        objective.update_metrics(metrics, out)
        total, count = total + float(out["loss"]) * len(batch["image"]), count + len(batch["image"])
    out = {k: float(v) for k, v in metrics.compute().items()}
    return out | {"retrieval/loss": total / count, "retrieval/pairs": count, "retrieval/split": conf.split}
