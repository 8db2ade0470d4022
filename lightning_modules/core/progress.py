"""Where a run stands in its epoch, read from Lightning's restored progress: the data loaders, the module and the
freezing callbacks all redo an epoch's start when a run resumes in the middle of it (callbacks/seeding.py)."""

from __future__ import annotations


def resuming_mid_epoch(trainer) -> bool:
    """Whether fit is resuming from a checkpoint taken part-way through the current epoch: Lightning's restored
    progress counts the epoch's batches already trained (until the epoch loop resets it at its first step)."""
    loop = trainer.fit_loop.epoch_loop
    return bool(loop.restarting) and 0 < loop.batch_progress.current.ready < trainer.num_training_batches
