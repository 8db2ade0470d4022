"""What the Hydra entry points share: check the config, run, turn a user mistake into one line."""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from datamodules.errors import ConfigError
from lightning_modules.config_check import check_config


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def main(cfg: DictConfig):
    """Run one job; returns ``optimized_metric`` for Hydra sweepers."""
    try:
        check_config(cfg)
        from lightning_modules.run import run  # heavy imports only once the config is known good

        metrics = run(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        if _in_multirun():  # the sweep goes on; this job is recorded as failed by run()
            return float("nan")
        sys.exit(2)
    # The value at the checkpoint that validation selected (what the run was tested with), else the last.
    return metrics.get(f"{cfg.optimized_metric}_best", metrics.get(cfg.optimized_metric))
