#!/usr/bin/env python
"""Export a fine-tune's classifier (its model/) to ONNX or torch.export's .pt2, checked against PyTorch.

python scripts/export.py run_dir=outputs/finetune/<timestamp> format=onnx
python scripts/export.py run_dir=outputs/finetune/<timestamp> format=pt2 input=/data/some_photos
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lightning_modules.runtime.cli import main as run_job  # noqa: E402  (light: no torch import)


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig):
    return run_job(cfg)


if __name__ == "__main__":
    main()
