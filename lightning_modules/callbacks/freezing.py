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

A backbone made of towers (a dual encoder's ``image`` and ``text``) is frozen tower by tower, each counted from
its own input side: the strategy applies to every tower, and a tower given a value of its own (``freeze.image``,
``freeze.text``: a number of groups or ``all``, as ``freeze.layers``) keeps that many groups frozen for the
whole run instead. ``freeze.text=all`` locks the text tower (LiT), whatever the strategy does with the other.

``freeze=lora`` (``Adapters``) freezes the whole backbone for good and trains peft's adapters put into it
(``backbones/adapters.py``) and the head: the adapters go in before the training module and its optimizer are
built (``prepare``), only above the first ``freeze.layers`` groups, and the frozen weights are left out of the
optimizer altogether (``optim.py``).
"""

from __future__ import annotations

import warnings

from pytorch_lightning.callbacks import BaseFinetuning
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_modules.backbones.adapters import adapter_ids, add_adapters, has_adapters, peft_models
from lightning_modules.config.rules import check
from lightning_modules.core.errors import ConfigError
from lightning_modules.core.progress import resuming_mid_epoch
from lightning_modules.training.optim import refresh_lrs

# Frozen groups run in eval mode on purpose; Lightning warns about any module in eval mode at fit start.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def resolve_layers(layers, num_groups: int, key: str = "freeze.layers", what: str = "the backbone") -> int:
    """``freeze.layers`` (an int or ``all``) as a number of groups, checked against the backbone (or a tower)."""
    if layers == "all":
        return num_groups
    if isinstance(layers, bool) or not isinstance(layers, int) or not 0 <= layers <= num_groups:
        raise ConfigError(
            f"{key}={layers} is out of range: {what} has {num_groups} layer groups;"
            f" allowed are 0..{num_groups} or 'all'"
        )
    return layers


def _what(tower: str) -> str:
    return f"the {tower} tower" if tower else "the backbone"


class LayerFreezing(BaseFinetuning):
    """Base: subclasses define ``frozen_count(epoch, num_groups, tower)`` (``what`` names the tower in messages).
    ``towers``: a fixed count per tower by tower name (``image=...``, ``text=...``; None: the strategy's)."""

    def __init__(self, train_bn: bool = False, **towers):
        super().__init__()
        self.train_bn = train_bn
        self.towers = {name: check(f"freeze.{name}", value) for name, value in towers.items()}
        self.frozen_groups: list = []
        self._frozen_towers: list = []  # the backbone (or the towers of one) whose every group is frozen

    def frozen_count(self, epoch: int, num_groups: int, what: str = "the backbone") -> int:
        raise NotImplementedError

    def tower_count(self, tower: str, epoch: int, num_groups: int) -> int:
        """How many of a tower's groups are frozen in ``epoch``: its own ``freeze.<tower>``, else the strategy's."""
        fixed = self.towers.get(tower)
        if fixed is not None:
            return resolve_layers(fixed, num_groups, f"freeze.{tower}", _what(tower))
        return self.frozen_count(epoch, num_groups, _what(tower))

    def validate(self, backbone) -> None:
        """Raise a ConfigError for parameters that do not fit this backbone, before training starts."""
        groups = backbone.tower_groups()
        for tower, value in self.towers.items():
            if value is not None and tower not in groups:
                raise ConfigError(
                    f"freeze.{tower}={value}: the backbone has no {tower} tower; allowed is freeze.{tower}=null"
                )
        for tower, tower_groups in groups.items():
            self.tower_count(tower, 0, len(tower_groups))

    def prepare(self, backbone) -> None:
        """Change the backbone before the training module and its optimizer are built (nothing, but for adapters)."""

    def frozen_throughout(self, num_groups: int, epochs: int) -> bool:
        """Whether every group stays frozen, in eval mode, for all ``epochs``: the backbone is then a fixed
        function of its input (what lets callbacks/feature_cache.py compute its features once)."""
        return not self.train_bn and all(self.frozen_count(e, num_groups) == num_groups for e in range(epochs))

    def apply(self, pl_module, epoch: int) -> None:
        self.frozen_groups, self._frozen_towers = [], []
        towers = pl_module.backbone.towers() or {"": pl_module.backbone}
        for tower, groups in pl_module.backbone.tower_groups().items():
            n = self.tower_count(tower, epoch, len(groups))
            for i, group in enumerate(groups):
                for p in group.params.values():
                    p.requires_grad = i >= n
            self.frozen_groups += groups[:n]
            if n == len(groups):  # wholly frozen: a fixed feature extractor (see _set_eval)
                self._frozen_towers.append(towers[tower])
        self._set_eval()

    def _set_eval(self) -> None:
        # A wholly frozen backbone (or tower) is a fixed feature extractor: all of it in eval mode, including modules
        # that hold no parameters (a dropout before a removed classifier), so it computes the same features each time.
        for tower in self._frozen_towers:
            tower.eval()
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

    def on_train_start(self, trainer, pl_module) -> None:
        # Resumed mid-epoch, Lightning skips the epoch's start: put that epoch's state in place here.
        if resuming_mid_epoch(trainer):
            for optimizer in trainer.optimizers:
                self.finetune_function(pl_module, trainer.current_epoch, optimizer)
            self._set_eval()


class FreezeLayers(LayerFreezing):
    """Freeze the first ``layers`` layer groups (``all`` = linear probe) for the whole run."""

    def __init__(self, layers=0, train_bn: bool = False, **towers):
        super().__init__(train_bn, **towers)
        self.layers = layers

    def frozen_count(self, epoch: int, num_groups: int, what: str = "the backbone") -> int:
        return resolve_layers(self.layers, num_groups, what=what)


class GradualUnfreezing(LayerFreezing):
    """ULMFiT-style: the head and the top ``start`` groups train from the start; one more group,
    from the top down, is unfrozen every ``every`` epochs."""

    def __init__(self, start: int = 0, every: int = 1, train_bn: bool = False, **towers):
        super().__init__(train_bn, **towers)
        self.start = check("freeze.start", start)
        self.every = check("freeze.every", every)

    def frozen_count(self, epoch: int, num_groups: int, what: str = "the backbone") -> int:
        if self.start > num_groups:
            raise ConfigError(
                f"freeze.start={self.start} is out of range: {what} has {num_groups} layer groups;"
                f" allowed are 0..{num_groups}"
            )
        return max(0, num_groups - self.start - epoch // self.every)


class LinearProbeThenFinetune(LayerFreezing):
    """LP-FT (Kumar et al. 2022): train only the head for ``probe_epochs``, then everything, with
    every group's learning rate multiplied by ``ft_lr_scale``."""

    def __init__(self, probe_epochs: int = 5, ft_lr_scale: float = 0.1, train_bn: bool = False, **towers):
        super().__init__(train_bn, **towers)
        self.probe_epochs = check("freeze.probe_epochs", probe_epochs)
        self.ft_lr_scale = float(check("freeze.ft_lr_scale", ft_lr_scale))

    def frozen_count(self, epoch: int, num_groups: int, what: str = "the backbone") -> int:
        return num_groups if epoch < self.probe_epochs else 0

    def finetune_function(self, pl_module, epoch: int, optimizer) -> None:
        super().finetune_function(pl_module, epoch, optimizer)
        scale = 1.0 if epoch < self.probe_epochs else self.ft_lr_scale
        for group in optimizer.param_groups:
            group["lr_scale"] = group.get("layer_scale", 1.0) * scale
        refresh_lrs(pl_module.trainer)


class Adapters(LayerFreezing):
    """``freeze=lora``: the backbone frozen bit-for-bit, peft's adapters (``method``: lora, dora, ia3) on the modules
    ``targets`` names in the layer groups above the first ``layers``, and the head, trained; with ``probe_epochs``
    (LP-FT) the head alone first. BatchNorm stays in eval mode (its statistics are the pre-trained ones) unless
    ``train_bn``; dropout runs as in any fine-tune."""

    def __init__(
        self,
        method: str = "lora",
        targets="auto",
        rank: int | None = None,
        alpha: float | None = None,
        dropout: float | None = None,
        use_rslora: bool | None = None,
        layers=0,
        probe_epochs: int = 0,
        train_bn: bool = False,
        **towers,
    ):
        super().__init__(train_bn, **towers)
        self.layers = check("freeze.layers", layers)
        self.probe_epochs = check("freeze.probe_epochs", probe_epochs)
        self.settings = {"method": check("freeze.method", method), "targets": check("freeze.targets", targets)}
        # IA3 given LoRA's options is refused by the config check (rules/freeze.py), in one line
        lora = {"rank": rank, "alpha": alpha, "dropout": dropout, "use_rslora": use_rslora}
        self.settings.update(lora)
        self._trained: set[int] = set()
        self._batchnorms: list = []

    def frozen_count(self, epoch: int, num_groups: int, what: str = "the backbone") -> int:
        """The groups without adapters (the stem first)."""
        return resolve_layers(self.layers, num_groups, what=what)

    def prepare(self, backbone) -> None:
        if not has_adapters(backbone):
            skipped = {tower: self.tower_count(tower, 0, len(g)) for tower, g in backbone.tower_groups().items()}
            add_adapters(backbone, self.settings, skipped)
        self._trained = adapter_ids(backbone)

    def frozen_throughout(self, num_groups: int, epochs: int) -> bool:
        return False  # the adapters change the features: none to cache

    def apply(self, pl_module, epoch: int) -> None:
        backbone = pl_module.backbone
        training = epoch >= self.probe_epochs  # LP-FT: the head alone for the probe's epochs
        for p in backbone.parameters():
            p.requires_grad = training and id(p) in self._trained
        towers = backbone.towers() or {"": backbone}
        adapted = peft_models(backbone)
        self.frozen_groups = []
        self._frozen_towers = [t for name, t in towers.items() if not training or name not in adapted]
        self._batchnorms = [] if self.train_bn else [m for m in backbone.modules() if isinstance(m, _BatchNorm)]
        self._set_eval()

    def _set_eval(self) -> None:
        super()._set_eval()  # towers without adapters (all of them while probing): fixed feature extractors
        for module in self._batchnorms:
            module.eval()
