"""Frozen layer groups stay bit-for-bit unchanged (BatchNorm statistics included); the rest trains."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.callbacks.freezing import FreezeLayers, resolve_layers
from lightning_modules.core.errors import ConfigError
from tests.helpers import fit_tiny, group_keys, resnet, vit


def _fit(backbone, layers, train_bn=False, epochs=2):
    module, before = fit_tiny(backbone, [FreezeLayers(layers, train_bn=train_bn)], epochs)
    after = module.state_dict()
    return module, {k for k in before if not torch.equal(before[k], after[k])}


def _keys_of(module, groups):
    return set().union(*(group_keys(module, g) for g in groups))


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
