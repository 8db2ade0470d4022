"""What every pretune DataModule answers, whatever its modality.

- ``modality`` (class attribute): the batch entries it fills (``image``, ``text``, ...).
- ``spec`` after ``setup``: an ``ImageSpec``/``TextSpec`` for the objectives and backbones.
- ``use_backbone(backbone)``: called by the run before ``setup``, so a source can take from the backbone what
  turns its raw input into tensors (a text source its tokenizer); an image source needs nothing.
- ``describe()``: what the run record keeps under ``data`` (which loading path, the augmentation as resolved).
- ``export_files()``: what a pre-training run keeps about its data next to ``backbone/`` (the pairs' captions).
- ``can_cache_features()`` / ``cache_features(encode)``: whether a frozen backbone's features can be computed
  once and carried in the batches (in-memory data, no augmentation), and doing it (callbacks/feature_cache.py).
- ``eval_loader(split, batch_size=None, sharded=True)``: a split in order, as validation and test see it
  (``sharded=False``: all of it on this process).
- ``eval_preprocessing()`` after ``setup``: what a raw input goes through before the backbone at evaluation, as
  plain values (images: channels, size, resizing, mean and std per channel; text: the token limit), so that an
  exported model (a fine-tune's ``model/``, a pre-training's ``backbone/``) carries it and ``scripts/predict.py``
  applies it to new inputs without the datamodule.
- Loaders shard every global batch across ranks (``shard``) and reshuffle by epoch (``epoch``), so a run
  resumed at epoch k, or split over W processes, sees the batches the uninterrupted single process sees; a
  train loader skips ``batches_trained()`` batches, so a run resumed from a mid-epoch checkpoint does too.
"""

from __future__ import annotations

import pytorch_lightning as pl

from lightning_modules.core.progress import resuming_mid_epoch


class PretuneDataModule(pl.LightningDataModule):
    modality = "image"
    spec = None

    def use_backbone(self, backbone) -> None:
        """Take what this source needs from the backbone before ``setup`` (nothing, by default)."""

    def describe(self) -> dict:
        """What this source resolved for the run record's ``data`` (the loading path, the augmentation recipe)."""
        return {}

    def export_files(self) -> dict:
        """Files a pre-training run writes next to its ``backbone/`` (name -> JSON-serialisable content): what a later
        evaluation needs to know about the data (image–text pairs: a sample of their captions)."""
        return {}

    def eval_preprocessing(self) -> dict | None:
        """What an input goes through at evaluation (see the module docstring); None: a source that cannot say."""
        return None

    def can_cache_features(self) -> bool:
        """Whether ``cache_features`` can store features for every example (False: a source that streams)."""
        return False

    def cache_features(self, encode) -> None:
        raise NotImplementedError

    def epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.current_epoch if trainer is not None else 0

    def batches_trained(self) -> int:
        """On a resume from a mid-epoch checkpoint, the current epoch's batches already trained (Lightning's
        restored progress), which the train loader skips; else 0."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or not resuming_mid_epoch(trainer):
            return 0
        return trainer.fit_loop.epoch_loop.batch_progress.current.ready

    def shard(self) -> dict:
        """This process's place in a distributed run: every loader shards each global batch by it."""
        trainer = getattr(self, "trainer", None)
        return {"rank": trainer.global_rank, "world": trainer.world_size} if trainer is not None else {}
