"""W&B, the way a sweep wants it: one run per job, named and grouped from the Hydra job; offline
unless a key is configured; a sweep's report as a run of its own. (Backbones as model artifacts, and their
lineage: ``backbones/artifacts.py``.)

wandb is imported only inside the functions that need it: it is heavy and optional at run time.
"""

from __future__ import annotations

import netrc
import os
import secrets
import string
from pathlib import Path

from lightning_modules.core.extras import require
from lightning_modules.core.results import read_run_record


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


def run_id(out_dir: Path, resuming: bool) -> str:
    """The W&B run's id, kept in the run record (``run.json``): a run that resumes in its own run dir
    (``ckpt_path=last``, a requeued SLURM job) takes the id its earlier attempt recorded, and its logger continues
    that W&B run (``resume="allow"``) instead of starting another; any other run gets a new id."""
    if resuming:
        try:
            earlier = (read_run_record(out_dir).get("wandb") or {}).get("id")
        except (OSError, ValueError):  # no record (a checkpoint from another run dir), or an unreadable one
            earlier = None
        if earlier:
            return earlier
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # as W&B makes them


def log_report(report_dir: Path, runs_csv: Path, images: list[Path], wandb_cfg: dict) -> None:
    """A sweep's report as its own W&B run (job_type ``report``) in the sweep's group: the runs table
    and every plot as an image, next to the runs it summarises."""
    import csv

    require("report --wandb", "wandb")
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
