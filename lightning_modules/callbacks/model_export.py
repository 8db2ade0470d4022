"""At the end of a fine-tune: ``model/`` (``backbones/model_dir.py``), the whole classifier in its family's own
format, from the weights the test metrics came from; then, when asked, the same folder as a W&B model artifact and
on the Hugging Face Hub.

It is written when the test stage ends (``teardown``): ``trainer.test`` has loaded the checkpoint validation
selected (or, without checkpoints, kept the last weights) and measured it, so ``model/`` holds exactly what
``metrics.json``'s ``test/*`` describe, and its card carries them. Global rank 0 writes; the weights are the same on
every rank. A backbone its family cannot export, an objective without a linear head (a ``clm`` fine-tune), or any
failure writing it, is one warning line and ``model/skipped`` in ``metrics.json``: the run's results stand.

A backbone with adapters (``freeze=lora``, ``backbones/adapters.py``) is written merged (the adapters folded into
its weights: ``model/`` loads with no peft installed), and its adapters alone go beside, in peft's own format
(``model/adapter/``), logged to W&B as an artifact of their own (``<model artifact>-adapter``: megabytes, not the
whole model).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pytorch_lightning.callbacks import Callback

from lightning_modules.backbones.adapters import ADAPTER_DIR, has_adapters, merged, save_adapter
from lightning_modules.backbones.artifacts import log_folder
from lightning_modules.backbones.model_dir import push_to_hub, write_model
from lightning_modules.core.errors import ConfigError, message_of


class ModelExport(Callback):
    """``target``: the ``model/`` to write; ``about``: what its ``pretune.json`` and card say of where it came from
    (run dir, data, the weights it started from); ``artifact``: the W&B artifact name (when the run logs to W&B);
    ``hub_repo``: the Hugging Face Hub repository to push to (``push_to_hub``), or None."""

    def __init__(self, target: Path, about: dict, artifact: str | None = None, hub_repo: str | None = None):
        self.target, self.about, self.artifact, self.hub_repo = Path(target), about, artifact, hub_repo
        self.outcome: dict = {}

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "test" and trainer.is_global_zero:  # the same weights on every rank: one export
            self.export(trainer, pl_module)

    def export(self, trainer, pl_module) -> None:
        started = time.perf_counter()
        head = getattr(pl_module.objective, "linear_head", None)
        datamodule = trainer.datamodule
        preprocessing = datamodule.eval_preprocessing() if datamodule is not None else None
        try:
            if head is None:
                raise ConfigError(
                    f"objective {type(pl_module.objective).__name__} has no linear classification head, so model/ is"
                    " not written; its weights are in checkpoints/"
                )
            if not preprocessing:
                raise ConfigError(f"{type(datamodule).__name__} does not say its evaluation preprocessing")
            about = {**self.about, "metrics": _metrics(trainer)}
            labels = datamodule.spec.class_names
            backbone, extra = pl_module.backbone, None
            if has_adapters(backbone):  # model/ merged, adapter/ beside it

                def extra(folder: Path, trained=backbone) -> None:
                    save_adapter(trained, head, folder, labels, preprocessing, _base_name(self.about, trained))

                backbone = merged(backbone)
            directory = write_model(backbone, head, self.target, labels, preprocessing, about, extra)
        except Exception as err:  # the run's results stand without model/: a warning, not a failed run
            why = str(err) if isinstance(err, ConfigError) else f"not written ({type(err).__name__}: {message_of(err)})"
            self.outcome = {"model/skipped": why}
            print(f"warning: model/: {why}", file=sys.stderr, flush=True)
            return
        self.outcome = {"model/dir": directory.name, "time/model_export_s": round(time.perf_counter() - started, 3)}
        if (directory / ADAPTER_DIR).is_dir():
            self.outcome["model/adapter"] = f"{directory.name}/{ADAPTER_DIR}"
        self._log_artifact(trainer, directory, about)
        if self.hub_repo:
            self._push(directory)

    def _log_artifact(self, trainer, directory: Path, about: dict) -> None:
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger" and self.artifact:
                log_folder(logger.experiment, directory, self.artifact, about)
                if (
                    directory / ADAPTER_DIR
                ).is_dir():  # the adapters alone: what serving many tasks from one base needs
                    log_folder(logger.experiment, directory / ADAPTER_DIR, f"{self.artifact}-adapter", about)

    def _push(self, directory: Path) -> None:
        """The Hub push comes after training; when it fails (the network, a permission) the run's results and
        ``model/`` stand, and the line says how to push it by hand."""
        try:
            self.outcome["hub/url"] = push_to_hub(directory, self.hub_repo)
        except Exception as err:  # huggingface_hub raises many types (HTTP, auth, network)
            self.outcome["hub/error"] = message_of(err)
            print(
                f"warning: push_to_hub={self.hub_repo}: the push failed ({type(err).__name__}: {message_of(err)});"
                f" model/ is in {directory}: hf upload {self.hub_repo} {directory}",
                file=sys.stderr,
                flush=True,
            )

    def run_metrics(self) -> dict:
        """For metrics.json: where model/ is (or why it is not), and what writing it took."""
        return dict(self.outcome)


def _base_name(about: dict, backbone) -> str:
    """What the adapters were trained on, for peft's ``base_model_name_or_path``: the weights' Hugging Face name or
    path, else the architecture's name."""
    weights = about.get("pretrained") or {}
    return str(weights.get("hf") or weights.get("path") or backbone.spec.get("name") or type(backbone).__name__)


def _metrics(trainer) -> dict:
    """What the exported weights scored: the test metrics, and the best validation score that selected them."""
    out = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    checkpoint = trainer.checkpoint_callback
    score = getattr(checkpoint, "best_model_score", None) if checkpoint is not None else None
    if score is not None:
        out[f"{checkpoint.monitor}_best"] = float(score)
    return out
