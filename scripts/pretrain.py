#!/usr/bin/env python
"""Pre-train a backbone with a self-supervised objective; the run exports backbone/.

python scripts/pretrain.py objective=mae model=vit_micro datamodule=digits
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lightning_modules.runtime.cli import main as run_job  # noqa: E402  (light: no torch import)
from lightning_modules.runtime.cli import this_node  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="pretrain")
def main(cfg: DictConfig):
    return run_job(cfg)


if __name__ == "__main__":
    sys.argv = this_node(sys.argv)  # node 1.. of a run started by hand on several: its own log, no second .hydra/
    main()
