"""Randomness that depends only on (seed, epoch), so a run resumed from an epoch-end checkpoint
draws exactly the augmentations, masks and dropout an uninterrupted run draws. (Lightning's
checkpoints do not carry the global RNG state.)"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback


class EpochSeed(Callback):
    def __init__(self, seed: int):
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        pl.seed_everything(self.seed * 10_007 + trainer.current_epoch, workers=True, verbose=False)
