"""scikit-learn's handwritten digits: 1,797 real 8x8 images that ship with the install."""

from __future__ import annotations

import numpy as np
import torch

from datamodules.loading.in_memory import InMemoryImageDataModule


class DigitsDataModule(InMemoryImageDataModule):
    name = "digits"
    pixel_max = 16  # the images hold the integers 0..16

    def load(self):
        from sklearn.datasets import load_digits

        data = load_digits()
        images = torch.from_numpy(data.images.astype(np.uint8)).unsqueeze(1)  # 8x8; resized per batch
        return images, data.target.astype(np.int64), tuple(str(c) for c in range(10))
