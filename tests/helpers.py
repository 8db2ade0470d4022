"""Small builders shared by the unit tests: tiny backbones and data specs, no config needed."""

from __future__ import annotations

import torch

from datamodules.in_memory import DataSpec
from lightning_modules.backbone import Backbone

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
RESNET = ("resnet18", {"in_chans": 1, "layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8})
SPEC = DataSpec(channels=1, image_size=16, num_classes=3, class_names=("a", "b", "c"))


def vit() -> Backbone:
    return Backbone(*VIT)


def resnet() -> Backbone:
    return Backbone(*RESNET)


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
