"""W&B, the way a sweep wants it: one run per job, named and grouped from the Hydra job; offline
unless a key is configured; pre-trained backbones logged as model artifacts and fetched back by
``model.init=wandb:<entity>/<project>/<name>:<alias>``, so the dashboard links each fine-tune to
the pre-training it came from.

wandb is imported only inside the functions that need it: it is heavy and optional at run time.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from lightning_modules.config.errors import ConfigError

PREFIX = "wandb:"
ARTIFACT_CACHE = Path(os.environ.get("PRETUNE_ARTIFACT_CACHE", "~/.cache/pretune/artifacts")).expanduser()


def offline_default() -> bool:
    """Offline when no key is configured (``wandb sync`` uploads later), online when one is."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is None
    except (FileNotFoundError, netrc.NetrcParseError):
        return True


def run_label(path: Path, log_dir: Path) -> str:
    """How W&B names a run (or a group) dir: relative to ``paths.log_dir``, else by its own name."""
    path, log_dir = Path(path).resolve(), Path(log_dir).resolve()
    return str(path.relative_to(log_dir)) if path.is_relative_to(log_dir) else path.name


def run_identity(log_dir: Path, out_dir: Path) -> dict:
    """Default run name and group: the run dir (relative to ``paths.log_dir``) names the run; the
    sweep dir groups a multirun's jobs, the study dir the runs of a study (runs inside the Hydra
    app's own output dir); a single run is grouped by its ``experiment=`` if any."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    relative = lambda path: run_label(path, log_dir)  # noqa: E731
    identity = {"name": relative(out_dir), "group": None}
    if HydraConfig.initialized():
        hydra = HydraConfig.get()
        app_dir = Path(hydra.runtime.output_dir).resolve()
        if hydra.mode == RunMode.MULTIRUN:
            identity["group"] = relative(hydra.sweep.dir)
        elif out_dir.resolve() != app_dir and out_dir.resolve().is_relative_to(app_dir):
            identity["group"] = relative(app_dir)
        else:
            identity["group"] = hydra.runtime.choices.get("experiment")
    return identity


def artifact_name(model_cfg, objective_target: str) -> str:
    """One artifact collection per backbone and objective (e.g. ``backbone-vit_tiny_patch16_224-mae``): each
    pre-training adds a version, ``:latest`` is the newest. The backbone is ``model.name``, or for a Hugging Face
    model (``model.init=hf:...``) its hub name or folder (``backbone-sentence-transformers_all-MiniLM-L6-v2-mlm``),
    not the preset's architecture name, which every such model of one family would share."""
    objective = str(objective_target).rsplit(".", 1)[-1].lower()
    init = str(model_cfg.get("init") or "")
    if init.startswith("hf:"):
        from lightning_modules.config.modalities import PACKAGE, hf_local_dir

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


def log_backbone(experiment, backbone_dir: Path, name: str, metadata: dict) -> None:
    import wandb

    artifact = wandb.Artifact(name, type="model", metadata=metadata)
    artifact.add_dir(str(backbone_dir))
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


def record_use(experiment, init: str) -> None:
    """Lineage: mark the fetched artifact as this run's input (an online run only; offline runs
    cannot, their config still names it under ``model.source``)."""
    if init.startswith(PREFIX) and not experiment.offline:
        experiment.use_artifact(init.removeprefix(PREFIX))


def log_report(report_dir: Path, runs_csv: Path, images: list[Path], wandb_cfg: dict) -> None:
    """A sweep's report as its own W&B run (job_type ``report``) in the sweep's group: the runs table
    and every plot as an image, next to the runs it summarises."""
    import csv

    import wandb

    with open(runs_csv, newline="") as fh:
        header, *rows = list(csv.reader(fh))
    group = wandb_cfg.get("group")
    run = wandb.init(
        project=wandb_cfg.get("project") or "pretune",
        entity=wandb_cfg.get("entity"),
        group=group,
        job_type="report",
        name=f"report/{group}" if group else "report",
        dir=str(report_dir),
        mode="offline" if offline_default() else "online",
    )
    try:
        run.log({"report/runs": wandb.Table(columns=header, data=rows)})
        run.log({f"report/{path.stem}": wandb.Image(str(path)) for path in images})
    finally:
        run.finish()
