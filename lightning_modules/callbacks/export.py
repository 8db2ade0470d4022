"""At the end of pre-training: export ``backbone/`` (weights, architecture, processor, the objective's heads, the
data's evaluation preprocessing) and, when the run logs to W&B, log it as a model artifact, so fine-tunes can load
it by path or by artifact. A backbone made of towers (a dual encoder) also logs each tower (``backbone/image``,
``backbone/text``) as an artifact of its own, named after the tower's model (``backbone-<model.text.name>-clip``).
A backbone pre-trained with adapters (``freeze=lora``, e.g. CLIP's image tower) is exported merged: the adapters
folded into its weights, a plain backbone that any fine-tune loads."""

from __future__ import annotations

from pathlib import Path

import yaml
from pytorch_lightning.callbacks import Callback

from lightning_modules.backbones.adapters import has_adapters, merged
from lightning_modules.backbones.artifacts import log_folder
from lightning_modules.backbones.handoff import export_backbone
from lightning_modules.core.distributed import unsharded
from lightning_modules.core.locations import CONFIG


class BackboneExport(Callback):
    """``target``: the ``backbone/`` to write; ``provenance``: where it came from (recorded in its config.yaml);
    ``objective_cfg``: the objective whose heads are saved with it; ``artifact_names``: the W&B artifact of each part
    (``""``: the whole backbone; a tower's name: that tower's folder); ``files``: what the data leave next to it
    (``datamodule.export_files()``)."""

    def __init__(
        self,
        target: Path,
        provenance: dict,
        objective_cfg: dict,
        artifact_names: dict[str, str],
        files: dict | None = None,
    ):
        self.target, self.provenance = Path(target), provenance
        self.objective_cfg, self.artifact_names, self.files = objective_cfg, artifact_names, files

    def on_fit_end(self, trainer, pl_module) -> None:
        datamodule = trainer.datamodule
        # FSDP: every rank helps gather the whole weights (rank 0 reads them); otherwise nothing to do
        with unsharded(pl_module, reader=trainer.is_global_zero):
            if trainer.is_global_zero:  # the same weights on every rank: one export
                # The objective says which backbone is kept: the trained one, or a teacher–student's teacher;
                # adapters (freeze=lora) are folded into its weights.
                backbone, weights = pl_module.objective.exported_backbone(pl_module.backbone)
                export_backbone(
                    merged(backbone) if has_adapters(backbone) else backbone,
                    self.target,
                    provenance=self.provenance,
                    objective=pl_module.objective,
                    objective_cfg=self.objective_cfg,
                    files=self.files,
                    preprocessing=datamodule.eval_preprocessing() if datamodule is not None else None,
                    weights=weights,
                )
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                for part, name in self.artifact_names.items():
                    directory = self.target / part
                    if (directory / CONFIG).is_file():  # the towers the export wrote
                        meta = yaml.safe_load((directory / CONFIG).read_text())
                        log_folder(logger.experiment, directory, name, meta)
