"""scikit-learn's handwritten digits: 1,797 real 8x8 images that ship with the install."""

from __future__ import annotations

import numpy as np
import torch

from datamodules.loading.in_memory import InMemoryImageDataModule

# Zero-shot prompts for handwritten digits (``scripts/evaluate.py zero_shot``): the digit datamodules' own, not a
# default for other data (a model is asked about a user's photos with generic prompts, ``objectives/clip.py``).
DIGIT_PROMPTS = ("a handwritten {}", "the digit {}", "the number {}", "a picture of the number {}")


class DigitsDataModule(InMemoryImageDataModule):
    name = "digits"
    pixel_max = 16  # the images hold the integers 0..16
    prompt_templates = DIGIT_PROMPTS

    def load(self):
        from sklearn.datasets import load_digits

        data = load_digits()
        images = torch.from_numpy(data.images.astype(np.uint8)).unsqueeze(1)  # 8x8; resized per batch
        return images, data.target.astype(np.int64), tuple(str(c) for c in range(10))
