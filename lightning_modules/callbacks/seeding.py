"""Randomness that depends only on (seed, epoch), so a run resumed from an epoch-end checkpoint
draws exactly the augmentations, masks and dropout an uninterrupted run draws. (Lightning's
checkpoints do not carry the global RNG state.)

A checkpoint written in the middle of an epoch (``every_n_train_steps``) carries the generators' states as they
were after its last trained batch; a run resumed from it continues the epoch from there rather than from the
epoch's seed, so its remaining steps draw what the uninterrupted run's draw (the streaming loaders resume their
batches the same way; ``datamodules/streaming.py``)."""

from __future__ import annotations

import random

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback


def rng_states() -> dict:
    """torch's (CPU and CUDA), numpy's and Python's generator states, in types a ``weights_only`` load accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _batches_done(trainer) -> int:
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


class EpochSeed(Callback):
    def __init__(self, seed: int):
        self.seed = int(seed)
        self._resume: dict | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        pl.seed_everything(self.seed * 10_007 + trainer.current_epoch, workers=True, verbose=False)

    def on_train_start(self, trainer, pl_module) -> None:
        # Resumed in the middle of an epoch (Lightning then skips on_train_epoch_start): the generators as
        # they were after the checkpoint's last batch.
        resume, self._resume = self._resume, None
        done = _batches_done(trainer)
        if resume and done and resume["epoch"] == trainer.current_epoch and resume["batches"] == done:
            set_rng_states(resume["rng"])

    def state_dict(self) -> dict:
        trainer = self._trainer
        if trainer is None:
            return {}
        return {"epoch": trainer.current_epoch, "batches": _batches_done(trainer), "rng": rng_states()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume = state_dict or None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    _trainer = None
