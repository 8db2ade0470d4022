"""``last.ckpt`` on a cadence: every N epochs (the default, N=1), every N training steps, or every M minutes.

A ViT-S checkpoint with its AdamW state is ~260 MB: at real sizes, writing one every epoch can cost more than a
short epoch's training, and an epoch of a large dataset is too long to lose. Lightning's ``ModelCheckpoint`` has
the three triggers but wants exactly one of them; here the epoch cadence is the default and setting steps or
minutes replaces it (both at once is refused with one line).

A checkpoint taken in the middle of an epoch resumes exactly, as an epoch-end one does: the in-memory loader skips
the batches already trained (``BatchLoader``, from Lightning's restored progress), ``EpochSeed`` restores the RNG
state of that step, and the module its running loss sum.
"""

from __future__ import annotations

from datetime import timedelta

from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_modules.config.rules import check
from lightning_modules.core.errors import ConfigError


class LastCheckpoint(ModelCheckpoint):
    def __init__(
        self,
        every_n_epochs: int | None = 1,
        every_n_train_steps: int | None = None,
        every_minutes: float | None = None,
        **kwargs,
    ):
        prefix = "callbacks.last_checkpoint"
        check(f"{prefix}.every_n_epochs", every_n_epochs)
        check(f"{prefix}.every_n_train_steps", every_n_train_steps)
        check(f"{prefix}.every_minutes", every_minutes)
        if every_n_train_steps and every_minutes:
            raise ConfigError(
                f"{prefix}.every_n_train_steps={every_n_train_steps} and {prefix}.every_minutes={every_minutes}:"
                " allowed is one of them (either replaces every_n_epochs)"
            )
        interval = timedelta(minutes=every_minutes) if every_minutes else None
        if every_n_train_steps or interval:
            every_n_epochs = None
        super().__init__(
            every_n_epochs=every_n_epochs,
            every_n_train_steps=every_n_train_steps,
            train_time_interval=interval,
            **kwargs,
        )
