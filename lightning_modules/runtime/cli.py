"""What the Hydra entry points share: check the config, run, turn a user mistake into one line."""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

from lightning_modules.config.check import check_config
from lightning_modules.config.errors import ConfigError, TrainingDiverged
from lightning_modules.runtime.results import METRICS_FILE, is_rank_zero, write_metrics


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _record_failure(cfg: DictConfig, err: Exception) -> None:
    """A job refused before it ran still leaves a metrics.json saying so (run() records later failures)."""
    try:
        out_dir = Path(cfg.paths.output_dir)
    except Exception:  # no output dir to be had (e.g. the path itself is the mistake)
        return
    if is_rank_zero() and not (out_dir / METRICS_FILE).exists():
        write_metrics(out_dir, {"status": "failed", "stage": cfg.get("stage"), "error": str(err)})


def main(cfg: DictConfig):
    """Run one job; returns ``optimized_metric`` for Hydra sweepers."""
    try:
        check_config(cfg)
        # heavy imports only once the config is known good
        if cfg.get("stage") == "evaluate":
            from lightning_modules.runtime.evaluate import evaluate as run
        else:
            from lightning_modules.runtime.run import run

        metrics = run(cfg)
    except (ConfigError, TrainingDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        _record_failure(cfg, err)
        if _in_multirun():
            # The sweep goes on; this job is recorded as failed in its metrics.json. None, not NaN:
            # the Optuna sweeper marks a trial that returns None as failed, but crashes on a NaN.
            return None
        sys.exit(2 if isinstance(err, ConfigError) else 1)
    # The value at the checkpoint that validation selected (what the run was tested with), else the last.
    return metrics.get(f"{cfg.optimized_metric}_best", metrics.get(cfg.optimized_metric))
