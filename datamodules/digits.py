"""scikit-learn's handwritten digits: 1,797 real 8x8 images that ship with the install."""

from __future__ import annotations

import numpy as np
import torch

from datamodules.in_memory import InMemoryImageDataModule


class DigitsDataModule(InMemoryImageDataModule):
    name = "digits"

    def load(self):
        from sklearn.datasets import load_digits

        data = load_digits()
        images = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)  # values 0..16
        return self.resize(images), data.target.astype(np.int64), tuple(str(c) for c in range(10))
