"""Export a fine-tune's classifier (its model/) to ONNX or torch.export's .pt2, checked against PyTorch.

pretune export run_dir=outputs/finetune/<timestamp> format=onnx
pretune export run_dir=outputs/finetune/<timestamp> format=pt2 input=/data/some_photos

``scripts/export.py`` (from a checkout) runs this same application.
"""

import hydra
from omegaconf import DictConfig

from lightning_modules.runtime.cli import main as run_job  # light: no torch import
from pretune.commands.app import CONFIG_PATH, launch


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def app(cfg: DictConfig):
    return run_job(cfg)


def main() -> None:
    launch(app, node=False)


if __name__ == "__main__":  # a DDP rank of a `pretune` command re-runs this file
    main()
