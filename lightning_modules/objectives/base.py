"""The objective contract, shared by pre-training and fine-tuning; an objective built from its config
(``build_objective``), and a pre-training's objective rebuilt from its ``backbone/`` (``saved_objective``)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn

from datamodules.transforms.augment import BatchAugment
from lightning_modules.backbones.handoff import OBJECTIVE_WEIGHTS, read_backbone_config
from lightning_modules.config.library import bad_arguments, build, library_error
from lightning_modules.config.modalities import kind_mismatch
from lightning_modules.core.errors import ConfigError


class Objective(nn.Module):
    """One training signal. Holds its heads (not the backbone) and computes the loss.

    ``forward(backbone, batch)`` returns a dict with ``loss`` and whatever the metrics need. Batches are
    dicts (``image``, ``label``, ``input_ids`` ...), never tuples; the backbone reads its own entries.
    ``modalities`` says which inputs the objective takes (``image``, ``text``, ``image_text``: image–caption pairs
    on a dual encoder); a backbone or data of another modality is refused
    here with one line (and before anything heavy runs by ``config/check.py``, which reads these class attributes
    from the source: keep them literals).
    """

    modalities: ClassVar[tuple[str, ...]] = ("image",)
    # True when forward only takes the backbone's pooled features of the batch as it comes (no views, masks or
    # mixing): a frozen backbone's features can then be computed once (callbacks/feature_cache.py).
    pooled_only: bool = False
    # True for an objective trained on labels (a fine-tune's classifier): its own metrics say how it classifies, so
    # the feature monitor (callbacks/feature_monitor.py) stays off.
    supervised: bool = False
    # For text: the kind of backbone it needs ("encoder": BERT-style, "decoder": GPT-style), or None for either.
    text_kind: ClassVar[str | None] = None
    # True for an objective that only pre-trains (a fine-tune's default metrics and test step are a classifier's).
    pretrain_only: ClassVar[bool] = False

    def __init__(self, backbone, data):
        super().__init__()
        self.data = data
        name = type(self).__name__
        for what, modality in (("backbone", backbone.modality), ("data", data.modality)):
            if modality not in self.modalities:
                raise ConfigError(
                    f"objective {name} takes {' or '.join(self.modalities)} inputs, but the {what} is {modality}"
                )
        kind = getattr(backbone, "kind", None)
        if self.text_kind is not None and kind is not None and kind != self.text_kind:
            described = getattr(backbone, "described", f"the {type(backbone).__name__}")
            raise ConfigError(kind_mismatch(f"objective={name.lower()}", self.text_kind, described, kind))

    def view_augment(self, key: str, node: dict | None) -> BatchAugment:
        """The batch augmentation of one view of a self-supervised image objective, from ``objective.<key>``, at
        the data's image size and normalised with its statistics (SimCLR, BYOL, DINO, VICReg)."""
        stats = (self.data.mean, self.data.std)
        return BatchAugment.from_config(f"objective.{key}", node, self.data.image_size, stats=stats)

    # Where training is: (optimizer steps taken, steps the run will take). The module sets it before every training
    # step from the trainer's progress (restored on a resume), so a schedule read from it (an EMA teacher's momentum,
    # DINO's teacher temperature) is the uninterrupted run's.
    progress: tuple[int, int] = (0, 1)

    def make_metrics(self, prefix: str):
        """A torchmetrics collection fed by ``update_metrics``; ``None`` when the loss is the metric."""
        return None

    def after_step(self, backbone) -> None:
        """Called after every optimizer update with the backbone being trained (CLIP keeps its logit scale clamped
        here; an EMA teacher moves towards ``backbone``)."""

    def update_metrics(self, metrics, output: dict) -> None:
        raise NotImplementedError

    def optimized_parameters(self) -> dict[str, nn.Parameter]:
        """The objective's parameters the optimizer trains, by name: all of them, less those updated otherwise (an
        EMA teacher's, by ``after_step``)."""
        return dict(self.named_parameters())

    def exported_backbone(self, backbone) -> tuple[nn.Module, str | None]:
        """The backbone whose weights pre-training exports, and what they are when there is a choice (``weights`` in
        ``backbone/config.yaml``): the trained backbone itself here (None: nothing to say); a teacher–student
        objective may export its teacher instead."""
        return backbone, None


def build_objective(conf, backbone, data) -> Objective:
    """The objective ``conf`` names, on ``backbone`` and the data ``spec``. Both are passed as they are:
    given to Hydra's ``instantiate`` directly, a dataclass spec would be turned into a config."""
    make = build(conf, "objective", _partial_=True)
    try:
        return make(backbone=backbone, data=data)
    except TypeError as err:  # an argument the objective does not take (+objective.foo=1): one line naming it
        if bad_arguments(err, "/hydra/"):  # raised where Hydra's partial calls the class
            values = OmegaConf.to_container(conf, resolve=True) if OmegaConf.is_config(conf) else dict(conf)
            raise library_error("objective", values, err) from err
        raise


def saved_objective(source: dict | None, backbone, data):
    """The pre-training objective saved next to a backbone (its config in ``config.yaml``, its heads in
    ``objective.safetensors``), rebuilt on ``backbone`` and ``data`` with those weights; None when ``source`` (a
    resolved ``model.init``) is not a pretune pre-training run that saved one."""
    backbone_dir = Path(source["path"]) if source and "path" in source else None  # not hf:, a model of its own
    meta = read_backbone_config(backbone_dir) if backbone_dir else {}
    if not meta.get("objective") or not (backbone_dir / OBJECTIVE_WEIGHTS).is_file():
        return None
    objective = build_objective(meta["objective"], backbone, data)
    objective.load_state_dict(load_file(str(backbone_dir / OBJECTIVE_WEIGHTS)), strict=True)
    return objective
