#!/usr/bin/env python
"""Evaluate a pre-trained image–text (CLIP) model without training it; writes metrics.json.

python scripts/evaluate.py zero_shot model.init=<CLIP pre-training run> datamodule=mnist5k
python scripts/evaluate.py retrieval model.init=<CLIP pre-training run> datamodule=image_text datamodule.path=pairs.csv
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lightning_modules.runtime.cli import main as run_job  # noqa: E402  (light: no torch import)

TASKS = ("zero_shot", "retrieval")


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig):
    return run_job(cfg)


if __name__ == "__main__":
    # The task may come first as a bare word (`evaluate.py zero_shot ...`), short for task=zero_shot.
    if len(sys.argv) > 1 and sys.argv[1] in TASKS:
        sys.argv[1] = f"task={sys.argv[1]}"
    main()
