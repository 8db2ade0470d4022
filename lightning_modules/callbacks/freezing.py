"""Freezing strategies as Lightning ``BaseFinetuning`` callbacks over the backbone's layer groups.

Each strategy only says how many groups (counted from the input side) are frozen in a given
epoch; one method applies that state. Because the state is a function of the epoch alone, a run
resumed from a checkpoint lands in exactly the state an uninterrupted run has.

Frozen groups keep their parameters bit-for-bit (``requires_grad=False``: no gradient, so the
optimizer skips them) and run in eval mode, so BatchNorm running statistics stay as they
were and dropout stays off. Lightning's own ``freeze(train_bn=False)`` only stops BN from
*tracking* stats while still normalising with batch stats; and ``model.train()`` at each
epoch start would undo a one-off ``.eval()``, so it is re-applied every epoch.

Every parameter is in the optimizer from the start (see ``optim.py``), so unfreezing never adds
a parameter group and the LR schedule already covers the group it unfreezes.
"""

from __future__ import annotations

import warnings

from pytorch_lightning.callbacks import BaseFinetuning
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_modules.config.errors import ConfigError
from lightning_modules.config.schema import check
from lightning_modules.optim import refresh_lrs

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


class LayerFreezing(BaseFinetuning):
    """Base: subclasses define ``frozen_count(epoch, num_groups)``."""

    def __init__(self, train_bn: bool = False):
        super().__init__()
        self.train_bn = train_bn
        self.frozen_groups: list = []
        self._backbone = None  # set while every group is frozen

    def frozen_count(self, epoch: int, num_groups: int) -> int:
        raise NotImplementedError

    def validate(self, backbone) -> None:
        """Raise a ConfigError for parameters that do not fit this backbone, before training starts."""
        self.frozen_count(0, len(backbone.layer_groups()))

    def frozen_throughout(self, num_groups: int, epochs: int) -> bool:
        """Whether every group stays frozen, in eval mode, for all ``epochs``: the backbone is then a fixed
        function of its input (what lets callbacks/feature_cache.py compute its features once)."""
        return not self.train_bn and all(self.frozen_count(e, num_groups) == num_groups for e in range(epochs))

    def apply(self, pl_module, epoch: int) -> None:
        groups = pl_module.backbone.layer_groups()
        n = self.frozen_count(epoch, len(groups))
        for i, group in enumerate(groups):
            for p in group.params.values():
                p.requires_grad = i >= n
        self.frozen_groups = groups[:n]
        self._backbone = pl_module.backbone if n == len(groups) else None
        self._set_eval()

    def _set_eval(self) -> None:
        # A wholly frozen backbone is a fixed feature extractor: all of it in eval mode, including modules that
        # hold no parameters (a dropout before a removed classifier), so it computes the same features every time.
        if self._backbone is not None:
            self._backbone.eval()
        for group in self.frozen_groups:
            for module in group.modules:
                module.eval()
        if self.train_bn:  # BatchNorm inside frozen groups keeps adapting its statistics
            for group in self.frozen_groups:
                for module in group.modules:
                    if isinstance(module, _BatchNorm):
                        module.train()

    def freeze_before_training(self, pl_module) -> None:
        self.apply(pl_module, 0)

    def finetune_function(self, pl_module, epoch: int, optimizer) -> None:
        self.apply(pl_module, epoch)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)  # calls finetune_function(epoch)
        self._set_eval()  # after Lightning's model.train() for the new epoch


class FreezeLayers(LayerFreezing):
    """Freeze the first ``layers`` layer groups (``all`` = linear probe) for the whole run."""

    def __init__(self, layers=0, train_bn: bool = False):
        super().__init__(train_bn)
        self.layers = layers

    def frozen_count(self, epoch: int, num_groups: int) -> int:
        return resolve_layers(self.layers, num_groups)


class GradualUnfreezing(LayerFreezing):
    """ULMFiT-style: the head and the top ``start`` groups train from the start; one more group,
    from the top down, is unfrozen every ``every`` epochs."""

    def __init__(self, start: int = 0, every: int = 1, train_bn: bool = False):
        super().__init__(train_bn)
        self.start = check("freeze.start", start)
        self.every = check("freeze.every", every)

    def frozen_count(self, epoch: int, num_groups: int) -> int:
        if self.start > num_groups:
            raise ConfigError(
                f"freeze.start={self.start} is out of range: the backbone has {num_groups} layer groups;"
                f" allowed are 0..{num_groups}"
            )
        return max(0, num_groups - self.start - epoch // self.every)


class LinearProbeThenFinetune(LayerFreezing):
    """LP-FT (Kumar et al. 2022): train only the head for ``probe_epochs``, then everything, with
    every group's learning rate multiplied by ``ft_lr_scale``."""

    def __init__(self, probe_epochs: int = 5, ft_lr_scale: float = 0.1, train_bn: bool = False):
        super().__init__(train_bn)
        self.probe_epochs = check("freeze.probe_epochs", probe_epochs)
        self.ft_lr_scale = float(check("freeze.ft_lr_scale", ft_lr_scale))

    def frozen_count(self, epoch: int, num_groups: int) -> int:
        return num_groups if epoch < self.probe_epochs else 0

    def finetune_function(self, pl_module, epoch: int, optimizer) -> None:
        super().finetune_function(pl_module, epoch, optimizer)
        scale = 1.0 if epoch < self.probe_epochs else self.ft_lr_scale
        for group in optimizer.param_groups:
            group["lr_scale"] = group.get("layer_scale", 1.0) * scale
        refresh_lrs(pl_module.trainer)
