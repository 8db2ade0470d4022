"""What the Hydra entry points share: check the config, run, turn any failure into one line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lightning_modules.config.check import check_config
from lightning_modules.core.results import is_rank_zero, write_metrics
from lightning_modules.runtime.failure import report, warnings_to_log


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _output_dir(cfg: DictConfig) -> Path | None:
    try:
        return Path(OmegaConf.select(cfg, "paths.output_dir", throw_on_missing=True))
    except Exception:  # no output dir to be had (e.g. the path itself is the mistake)
        return None


def _record_failure(cfg: DictConfig, out_dir: Path | None, err: Exception) -> None:
    """The job leaves a metrics.json saying it failed, whatever an earlier attempt in this dir left."""
    if out_dir is None or not is_rank_zero():
        return
    try:
        stage = OmegaConf.select(cfg, "stage", default=None, throw_on_missing=False)
        error = f"{type(err).__name__}: {err}".splitlines()[0]
        write_metrics(out_dir, {"status": "failed", "stage": stage if isinstance(stage, str) else None, "error": error})
    except Exception:  # the output dir itself may be what failed
        pass


def this_node(argv: list[str]) -> list[str]:
    """The command line of this node when a run is started by hand on several (the same command on each, with
    ``NODE_RANK`` 0, 1, ...: docs/scaling-out.md). Node k > 0 shares the run dir with node 0 but writes nothing
    there (global rank 0 writes the run's files): not Hydra's ``.hydra/`` a second time, and its log as
    ``<script>_node<k>.log``, as a DDP child rank does (``runtime/parallel.py``). A child rank (``LOCAL_RANK`` set)
    already has its own; SLURM and torchrun set no ``NODE_RANK``."""
    node = os.environ.get("NODE_RANK", "0")
    if node in ("", "0") or "LOCAL_RANK" in os.environ:
        return argv
    return [*argv, "hydra.output_subdir=null", f"hydra.job.name={Path(argv[0]).stem}_node{node}"]


def main(cfg: DictConfig):
    """Run one job; returns ``optimized_metric`` for Hydra sweepers."""
    warnings_to_log()
    try:
        check_config(cfg)
        # heavy imports only once the config is known good
        stage = cfg.get("stage")
        if stage == "evaluate":
            from lightning_modules.runtime.evaluate import evaluate as run  # keeps torch out of the config check
        elif stage == "predict":
            from lightning_modules.runtime.predict import predict as run  # keeps torch out of the config check
        elif stage == "export":
            from lightning_modules.runtime.exporting import export as run  # keeps torch out of the config check
        else:
            from lightning_modules.runtime.run import run  # keeps torch out of the config check

        metrics = run(cfg)
    except Exception as err:
        out_dir = _output_dir(cfg)
        _record_failure(cfg, out_dir, err)
        code = report(err, out_dir)  # one line on stderr (HYDRA_FULL_ERROR=1: re-raised)
        if _in_multirun():
            # The sweep goes on; this job is recorded as failed in its metrics.json. None, not NaN:
            # the Optuna sweeper marks a trial that returns None as failed, but crashes on a NaN.
            return None
        sys.exit(code)
    # The value at the checkpoint that validation selected (what the run was tested with), else the last.
    optimized = cfg.get("optimized_metric")  # predict.py and export.py optimize nothing
    return metrics.get(f"{optimized}_best", metrics.get(optimized)) if optimized else None
