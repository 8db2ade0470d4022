"""Evaluate a pre-trained image–text (CLIP) model without training it; writes metrics.json.

pretune evaluate zero_shot model.init=<CLIP pre-training run> datamodule=mnist5k
pretune evaluate retrieval model.init=<CLIP pre-training run> datamodule=image_text datamodule.path=pairs.csv

``scripts/evaluate.py`` (from a checkout) runs this same application.
"""

import sys

import hydra
from omegaconf import DictConfig

from lightning_modules.runtime.cli import main as run_job  # light: no torch import
from pretune.commands.app import CONFIG_PATH, launch

TASKS = ("zero_shot", "retrieval")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate")
def app(cfg: DictConfig):
    return run_job(cfg)


def main() -> None:
    # The task may come first as a bare word (`evaluate zero_shot ...`), short for task=zero_shot.
    if len(sys.argv) > 1 and sys.argv[1] in TASKS:
        sys.argv[1] = f"task={sys.argv[1]}"
    launch(app, node=False)


if __name__ == "__main__":  # a DDP rank of a `pretune` command re-runs this file
    main()
