"""At the end of pre-training: export ``backbone/`` (weights, architecture, processor, the objective's heads)
and, when the run logs to W&B, log it as a model artifact, so fine-tunes can load it by path or by artifact.
A backbone made of towers (a dual encoder) also logs each tower (``backbone/image``, ``backbone/text``) as an
artifact of its own, named after the tower's model (``backbone-<model.text.name>-clip``)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback

from lightning_modules.backbones.artifacts import artifact_name, log_backbone
from lightning_modules.backbones.handoff import export_backbone
from lightning_modules.core.locations import CONFIG


class BackboneExport(Callback):
    def __init__(self, cfg: DictConfig, out_dir: Path):
        self.cfg, self.target = cfg, Path(out_dir) / "backbone"
        self.provenance = {
            "objective": cfg.objective.get("_target_"),
            "datamodule": cfg.datamodule.get("_target_"),
            "seed": cfg.seed,
            "run_dir": str(Path(out_dir).resolve()),
        }

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:  # the same weights on every rank: one export
            return
        export_backbone(
            pl_module.backbone,
            self.target,
            provenance=self.provenance,
            objective=pl_module.objective,
            objective_cfg=OmegaConf.to_container(self.cfg.objective, resolve=True),
        )
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                meta = OmegaConf.to_container(OmegaConf.load(self.target / CONFIG))  # towers: exported with it
                parts = [(self.target, self.cfg.model)]
                parts += [(self.target / t, self.cfg.model[t]) for t in meta.get("towers") or []]
                for directory, model_cfg in parts:
                    name = artifact_name(model_cfg, self.cfg.objective._target_)
                    part_meta = OmegaConf.to_container(OmegaConf.load(directory / CONFIG))
                    log_backbone(logger.experiment, directory, name, part_meta)
