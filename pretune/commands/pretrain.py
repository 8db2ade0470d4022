"""Pre-train a backbone with a self-supervised objective; the run exports backbone/.

pretune pretrain objective=mae model=vit_micro datamodule=digits

``scripts/pretrain.py`` (from a checkout) runs this same application.
"""

import hydra
from omegaconf import DictConfig

from lightning_modules.runtime.cli import main as run_job  # light: no torch import
from pretune.commands.app import CONFIG_PATH, launch


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="pretrain")
def app(cfg: DictConfig):
    return run_job(cfg)


def main() -> None:
    launch(app)  # node 1.. of a run started by hand on several: its own log, no second .hydra/


if __name__ == "__main__":  # a DDP rank of a `pretune` command re-runs this file
    main()
