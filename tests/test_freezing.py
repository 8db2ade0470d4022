"""Frozen layer groups stay bit-for-bit unchanged (BatchNorm statistics included); the rest trains."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from datamodules.errors import ConfigError
from datamodules.in_memory import BatchLoader
from lightning_modules.freezing import FreezeLayers, resolve_layers
from lightning_modules.module import PretuneModule
from lightning_modules.objectives.classification import Classification
from tests.helpers import SPEC, batch, resnet, vit


class _Data(pl.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.tensors = batch(32)

    def train_dataloader(self):
        return BatchLoader(self.tensors, 8, shuffle=True, drop_last=True)

    def val_dataloader(self):
        return BatchLoader(self.tensors, 16, shuffle=False, drop_last=False)


def _fit(backbone, layers, train_bn=False, epochs=2):
    torch.manual_seed(0)
    module = PretuneModule(
        backbone,
        Classification(backbone, SPEC),
        {"name": "adamw", "lr": 1e-2, "weight_decay": 0.05},
        {"name": "none"},
    )
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[FreezeLayers(layers, train_bn=train_bn)],
    )
    trainer.fit(module, datamodule=_Data())
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    return module, changed


def _keys_of(module, groups):
    """State-dict keys (parameters and buffers) of the given layer groups."""
    names = set()
    for g in groups:
        for m in g.modules:
            for n, mod in module.backbone.named_modules():
                if mod is m:
                    names |= {f"backbone.{n}.{k}" for k in mod.state_dict()}
        names |= {f"backbone.model.{n}" for n in g.params}
    return names


@pytest.mark.parametrize("make", [resnet, vit], ids=["resnet", "vit"])
@pytest.mark.parametrize("layers", [2, "all"])
def test_frozen_groups_are_bit_for_bit_unchanged(make, layers):
    backbone = make()
    groups = backbone.layer_groups()
    n = resolve_layers(layers, len(groups))
    module, changed = _fit(backbone, layers)
    frozen_keys = _keys_of(module, groups[:n])
    assert frozen_keys and not (frozen_keys & changed)
    if make is resnet:  # BatchNorm running statistics are among the unchanged keys
        assert any(k.endswith("running_mean") for k in frozen_keys)
    trainable_keys = _keys_of(module, groups[n:]) | {k for k in module.state_dict() if k.startswith("objective.")}
    params = {k for k in trainable_keys if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    # Everything not frozen did train (every trainable weight matrix moved).
    assert {k for k in params if k.endswith("weight")} <= changed


def test_train_bn_lets_frozen_batchnorm_adapt():
    backbone = resnet()
    _, changed = _fit(backbone, 2, train_bn=True)
    assert "backbone.model.bn1.running_mean" in changed
    assert "backbone.model.bn1.weight" not in changed  # the affine parameters stay frozen


@pytest.mark.parametrize("layers", [6, -1, 2.5, "half"])
def test_out_of_range_layers_say_how_many_groups(layers):
    with pytest.raises(ConfigError, match=rf"freeze.layers={layers} is out of range: the backbone has 5 layer groups"):
        FreezeLayers(layers).validate(resnet())
