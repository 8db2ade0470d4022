"""Run results on disk, written atomically: ``metrics.json`` (what the run measured) and ``run.json``, the run
record (what the run resolved that its composed ``config.yaml`` does not say: where the weights came from and their
sha256, the matmul precision ``auto`` became, which path the data took, the W&B run's name and group)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

METRICS_FILE = "metrics.json"
RUN_FILE = "run.json"

# The variables launchers set (torchrun: RANK; SLURM: SLURM_PROCID; Lightning's launcher: LOCAL_RANK and
# NODE_RANK). A process is the global rank 0 only if every one of them that is set is 0.
_RANK_VARS = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def is_rank_zero() -> bool:
    """Whether this process is global rank 0, from the environment: usable before a Trainer exists."""
    return all(os.environ.get(var, "0") == "0" for var in _RANK_VARS)


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file and rename, so a killed run never leaves a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


def write_metrics(run_dir: Path, metrics: dict) -> Path:
    path = Path(run_dir) / METRICS_FILE
    write_atomic(path, json.dumps({k: _clean(v) for k, v in metrics.items()}, indent=2, sort_keys=True) + "\n")
    return path


def read_metrics(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / METRICS_FILE).read_text())


def write_run_record(run_dir: Path, record: dict) -> Path:
    path = Path(run_dir) / RUN_FILE
    write_atomic(path, json.dumps(record, indent=2) + "\n")
    return path


def read_run_record(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / RUN_FILE).read_text())
