"""Predict with a trained classifier on new images or texts (no labels, no datamodule): predictions.csv.

pretune predict run_dir=outputs/finetune/<timestamp> input=/data/new_photos
pretune predict run_dir=outputs/finetune/<timestamp> input=texts.txt
pretune predict run_dir=outputs/finetune/<timestamp> input=reviews.csv text_column=review top_k=1
pretune predict run_dir=outputs/pretrain/<CLIP run> input=photos/ 'class_names=[cat, dog]'

``scripts/predict.py`` (from a checkout) runs this same application.
"""

import hydra
from omegaconf import DictConfig

from lightning_modules.runtime.cli import main as run_job  # light: no torch import
from pretune.commands.app import CONFIG_PATH, launch


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="predict")
def app(cfg: DictConfig):
    return run_job(cfg)


def main() -> None:
    launch(app, node=False)


if __name__ == "__main__":  # a DDP rank of a `pretune` command re-runs this file
    main()
