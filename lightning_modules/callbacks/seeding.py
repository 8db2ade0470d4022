"""Randomness that depends only on (seed, epoch), so a run resumed from an epoch-end checkpoint
draws exactly the augmentations, masks and dropout an uninterrupted run draws. (Lightning's
checkpoints do not carry the global RNG state.)

A checkpoint taken in the middle of an epoch (``callbacks.last_checkpoint.every_n_train_steps`` or
``every_minutes``) carries the RNG state of its step instead: a run resumed from it reseeds the epoch as
usual and then puts back that state, so its next step draws what the uninterrupted run's next step drew.

Lightning does not call ``on_train_epoch_start`` when it resumes in the middle of an epoch (the epoch has
started), so what pretune does at an epoch's start is redone for that epoch in ``on_train_start`` instead, here,
in the module (the running loss sum) and in the freezing callbacks (the epoch's frozen groups).
"""

from __future__ import annotations

import random

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from lightning_modules.core.progress import resuming_mid_epoch


def rng_state() -> dict:
    """torch (CPU and CUDA), numpy and Python RNG states, in types a ``weights_only`` load accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(state), py_gauss],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))


class EpochSeed(Callback):
    def __init__(self, seed: int):
        self.seed = int(seed)
        self._restored: dict | None = None

    def state_dict(self) -> dict:
        return {"rng": rng_state()}  # at the save: mid-epoch, the state after the steps so far

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict.get("rng")

    def on_train_start(self, trainer, pl_module) -> None:
        if self._restored is not None and resuming_mid_epoch(trainer):
            set_rng_state(self._restored)
        self._restored = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        pl.seed_everything(self.seed * 10_007 + trainer.current_epoch, workers=True, verbose=False)
