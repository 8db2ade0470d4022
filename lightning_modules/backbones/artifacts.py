"""Backbones as W&B model artifacts: each pre-training logs its ``backbone/`` as a new version of a collection
named after the backbone and the objective, and ``model.init=wandb:<entity>/<project>/<name>:<alias>`` fetches one
back and marks it as the run's input, so the dashboard links each fine-tune to the pre-training it came from. A
fine-tune logs its ``model/`` as a model artifact too (``model-<backbone>-<data>``), the run's output: backbone
artifact -> fine-tune run -> model artifact is the lineage.

wandb is imported only inside the functions that need it: it is heavy and optional at run time.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning_modules.core.errors import ConfigError
from lightning_modules.core.locations import PACKAGE, hf_local_dir

PREFIX = "wandb:"
ARTIFACT_CACHE = Path(os.environ.get("PRETUNE_ARTIFACT_CACHE", "~/.cache/pretune/artifacts")).expanduser()


def artifact_name(model_cfg, objective_target: str) -> str:
    """One artifact collection per backbone and objective (e.g. ``backbone-vit_tiny_patch16_224-mae``): each
    pre-training adds a version, ``:latest`` is the newest. The backbone is ``model.name``, or for a Hugging Face
    model (``model.init=hf:...``) its hub name or folder (``backbone-sentence-transformers_all-MiniLM-L6-v2-mlm``),
    not the preset's architecture name, which every such model of one family would share."""
    objective = str(objective_target).rsplit(".", 1)[-1].lower()
    init = str(model_cfg.get("init") or "")
    if init.startswith("hf:"):
        source = init.removeprefix("hf:").rstrip("/")
        if source.startswith((PACKAGE, "/", ".", "~")) or Path(source).expanduser().exists():  # a local folder:
            path = Path(hf_local_dir(source) if source.startswith(PACKAGE) else source).expanduser()
            # its name; a folder called just "model" (as a package ships one) with its parent's
            name = "_".join(path.resolve().parts[-2:]) if path.name == "model" else path.name
        else:
            name = source  # a hub name (whether it is cached is the loading's business, done by now)
    else:
        name = model_cfg.get("name")
    return f"backbone-{name}-{objective}".replace("/", "_")


def model_artifact_name(model_cfg, data_name: str, data_place=None) -> str:
    """A fine-tune's ``model/`` artifact: one collection per backbone and data (``model-resnet18-digits``), each
    fine-tune a new version. The data is the datamodule's ``name``, or the name of the folder or file it reads
    (``data_place``: an image folder's root, a text file)."""
    backbone = artifact_name(model_cfg, "x").removeprefix("backbone-").removesuffix("-x")
    data = Path(str(data_place)).expanduser().name.split(".")[0] if data_place else ""
    return f"model-{backbone}-{data or data_name}".replace("/", "_")


def log_folder(experiment, directory: Path, name: str, metadata: dict) -> None:
    """Log ``directory`` (a ``backbone/`` or a ``model/``) as a new version of the model artifact ``name``."""
    import wandb

    artifact = wandb.Artifact(name, type="model", metadata=metadata)
    artifact.add_dir(str(directory))
    experiment.log_artifact(artifact, aliases=["latest"])


def fetch_backbone(init: str) -> Path:
    """Download the artifact ``model.init=wandb:<entity>/<project>/<name>:<alias>`` names."""
    ref = init.removeprefix(PREFIX)  # its form was checked with the config (config_check)
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        raise ConfigError(
            f"model.init={init}: W&B is offline (WANDB_MODE={os.environ['WANDB_MODE']}); fetching an artifact"
            " needs a connection: unset WANDB_MODE, or download it once (wandb artifact get) and pass its directory"
        )
    try:
        import wandb

        artifact = wandb.Api().artifact(ref, type="model")
        return Path(artifact.download(root=str(ARTIFACT_CACHE / ref.replace(":", "/"))))
    except Exception as err:  # no key, no network, no such artifact: wandb raises many types
        first = str(err).splitlines()[0][:200] if str(err) else ""
        raise ConfigError(
            f"model.init={init}: could not fetch the W&B artifact ({type(err).__name__}: {first});"
            " this needs a W&B key (wandb login) and a connection"
        ) from err


def record_use(experiment, init: str, source: dict | None = None) -> None:
    """Lineage: mark the backbone this run starts from as its input: the fetched artifact (``wandb:``), or a local
    ``backbone/`` whose pre-training logged it (``source``, the run record's ``weights``: ``logged_as`` names the
    artifact; W&B finds the version with the same files). An online run only: W&B refuses ``use_artifact`` offline;
    the run record and the model artifact's metadata still name the source."""
    if experiment.offline:
        return
    if init.startswith(PREFIX):
        experiment.use_artifact(init.removeprefix(PREFIX))
    elif source and source.get("logged_as") and source.get("path"):
        import wandb

        artifact = wandb.Artifact(source["logged_as"], type="model")
        artifact.add_dir(source["path"])
        experiment.use_artifact(artifact)
