"""Freezing strategies as Lightning ``BaseFinetuning`` callbacks over the backbone's layer groups.

Frozen groups keep their parameters bit-for-bit (``requires_grad=False``: no gradient, so the
optimizer skips them) and run in eval mode, so BatchNorm running statistics stay as they
were and dropout stays off. Lightning's own ``freeze(train_bn=False)`` only stops BN from
*tracking* stats while still normalising with batch stats; and ``model.train()`` at each
epoch start would undo a one-off ``.eval()``, so it is re-applied every epoch.
"""

from __future__ import annotations

import warnings

from pytorch_lightning.callbacks import BaseFinetuning
from torch.nn.modules.batchnorm import _BatchNorm

from datamodules.errors import ConfigError

# Frozen groups run in eval mode on purpose; Lightning warns about any module in eval mode at fit start.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def resolve_layers(layers, num_groups: int) -> int:
    """``freeze.layers`` (an int or ``all``) as a number of groups, checked against the backbone."""
    if layers == "all":
        return num_groups
    if isinstance(layers, bool) or not isinstance(layers, int) or not 0 <= layers <= num_groups:
        raise ConfigError(
            f"freeze.layers={layers} is out of range: the backbone has {num_groups} layer groups;"
            f" allowed are 0..{num_groups} or 'all'"
        )
    return layers


class FreezeLayers(BaseFinetuning):
    """Freeze the first ``layers`` layer groups (``all`` = linear probe) for the whole run."""

    def __init__(self, layers=0, train_bn: bool = False):
        super().__init__()
        self.layers, self.train_bn = layers, train_bn
        self.frozen_groups: list = []

    def validate(self, backbone) -> None:
        resolve_layers(self.layers, len(backbone.layer_groups()))

    def freeze_before_training(self, pl_module) -> None:
        groups = pl_module.backbone.layer_groups()
        self.frozen_groups = groups[: resolve_layers(self.layers, len(groups))]
        for group in self.frozen_groups:
            for p in group.params.values():
                p.requires_grad = False
        self._set_eval()

    def _set_eval(self) -> None:
        for group in self.frozen_groups:
            for module in group.modules:
                module.eval()
        if self.train_bn:  # BatchNorm inside frozen groups keeps adapting its statistics
            for group in self.frozen_groups:
                for module in group.modules:
                    if isinstance(module, _BatchNorm):
                        module.train()

    def finetune_function(self, pl_module, epoch: int, optimizer) -> None:
        """Nothing is unfrozen: the first N groups stay frozen for the whole run."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._set_eval()
