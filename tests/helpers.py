"""Small builders shared by the unit tests: tiny backbones and data specs, no config needed."""

from __future__ import annotations

import torch

from datamodules.spec import ImageSpec
from lightning_modules.backbones.image import TimmBackbone

VIT = (
    "vit_tiny_patch16_224",
    {
        "img_size": 16,
        "in_chans": 1,
        "patch_size": 4,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "mlp_ratio": 2.0,
    },
)
TIMM = "lightning_modules.backbones.image.TimmBackbone"  # a model config's _target_ for a timm model
RESNET = ("resnet18", {"in_chans": 1, "layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8})
SPEC = ImageSpec(channels=1, image_size=16, num_classes=3, class_names=("a", "b", "c"))


def vit() -> TimmBackbone:
    return TimmBackbone(*VIT)


def resnet() -> TimmBackbone:
    return TimmBackbone(*RESNET)


def batch(n: int = 16, labels: bool = True, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    # Smooth images (upsampled 4x4 noise): structure that masked patches can be predicted from.
    coarse = torch.randn(n, 1, 4, 4, generator=gen)
    out = {"image": torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)}
    if labels:
        out["label"] = torch.randint(0, 3, (n,), generator=gen)
    return out


class StopAfter:
    """A Lightning callback (built lazily to keep this module light) that ends fit after ``epochs``
    epochs, as if the run had been killed right after its epoch-end checkpoint."""

    def __new__(cls, epochs: int):
        from pytorch_lightning.callbacks import Callback

        class _Stop(Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                if trainer.current_epoch + 1 >= epochs:
                    trainer.should_stop = True

        return _Stop()


def group_keys(module, group) -> set[str]:
    """State-dict keys of a ``PretuneModule`` that belong to one layer group: parameters and buffers."""
    keys = {f"backbone.model.{n}" for n in group.params}
    named = {id(m): n for n, m in module.backbone.model.named_modules()}
    for m in group.modules:
        keys |= {f"backbone.model.{named[id(m)]}.{b}" for b, _ in m.named_buffers()}
    return keys


def fit_tiny(backbone, callbacks, epochs=2, optimizer=None, scheduler=None):
    """Fit a classifier on 32 smooth images (4 batches of 8 per epoch) on the CPU.

    Returns the module and its state dict before training.
    """
    import pytorch_lightning as pl

    from datamodules.loading.in_memory import BatchLoader
    from lightning_modules.objectives.classification import Classification
    from lightning_modules.training.module import PretuneModule

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            return BatchLoader(batch(32), 8, shuffle=True, drop_last=True)

        def val_dataloader(self):
            return BatchLoader(batch(32), 16, shuffle=False, drop_last=False)

    torch.manual_seed(0)
    module = PretuneModule(
        backbone,
        Classification(backbone, SPEC),
        optimizer or {"name": "adamw", "lr": 1e-2, "weight_decay": 0.05},
        scheduler or {"name": "none"},
    )
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=Data())
    return module, before


class PauseAt:
    """A Lightning callback that, at batch ``batch`` of epoch ``epoch``, touches ``marker`` and
    sleeps: a run caught mid-epoch, for a test to kill."""

    def __new__(cls, epoch: int, batch: int, marker: str):
        import time
        from pathlib import Path

        from pytorch_lightning.callbacks import Callback

        class _Pause(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch_, batch_idx):
                if trainer.current_epoch == epoch and batch_idx == batch:
                    Path(marker).touch()
                    time.sleep(600)

        return _Pause()


class WaitAt:
    """A Lightning callback that, at batch ``batch`` of epoch ``epoch``, touches ``marker`` and waits until ``go``
    exists: a run caught mid-epoch, for a test to signal, then let go on."""

    def __new__(cls, epoch: int, batch: int, marker: str, go: str):
        import time
        from pathlib import Path

        from pytorch_lightning.callbacks import Callback

        class _Wait(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch_, batch_idx):
                if trainer.current_epoch == epoch and batch_idx == batch:
                    Path(marker).touch()
                    deadline = time.time() + 600
                    while not Path(go).exists() and time.time() < deadline:
                        time.sleep(0.05)

        return _Wait()


class SignalAt:
    """A Lightning callback that sends ``signum`` to its own process as optimizer step ``step`` starts (Python runs
    the handler at once, in the middle of that step)."""

    def __new__(cls, step: int, signum: int):
        import os

        from pytorch_lightning.callbacks import Callback

        class _Signal(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == step:
                    os.kill(os.getpid(), signum)

        return _Signal()


class StopAtStep:
    """A Lightning callback that ends fit after optimizer step ``step``, as if the run had been killed right after
    a checkpoint taken at that step (in the middle of an epoch)."""

    def __new__(cls, step: int):
        from pytorch_lightning.callbacks import Callback

        class _Stop(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step >= step:
                    trainer.should_stop = True

        return _Stop()
