"""Fine-tune a backbone on a labeled task; metrics.json holds val and test metrics..

pretune finetune datamodule=digits model.init=<pre-training run dir> freeze.layers=2

``scripts/finetune.py`` (from a checkout) runs this same application.
"""

import hydra
from omegaconf import DictConfig

from lightning_modules.runtime.cli import main as run_job  # light: no torch import
from pretune.commands.app import CONFIG_PATH, launch


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="finetune")
def app(cfg: DictConfig):
    return run_job(cfg)


def main() -> None:
    launch(app)  # node 1.. of a run started by hand on several: its own log, no second .hydra/


if __name__ == "__main__":  # a DDP rank of a `pretune` command re-runs this file
    main()
