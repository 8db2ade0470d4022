#!/usr/bin/env python
"""Predict with a trained classifier on new images or texts (no labels, no datamodule): predictions.csv.

python scripts/predict.py run_dir=outputs/finetune/<timestamp> input=/data/new_photos
python scripts/predict.py run_dir=outputs/finetune/<timestamp> input=texts.txt
python scripts/predict.py run_dir=outputs/finetune/<timestamp> input=reviews.csv text_column=review top_k=1
python scripts/predict.py run_dir=outputs/pretrain/<CLIP run> input=photos/ 'class_names=[cat, dog]'
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lightning_modules.runtime.cli import main as run_job  # noqa: E402  (light: no torch import)


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig):
    return run_job(cfg)


if __name__ == "__main__":
    main()
