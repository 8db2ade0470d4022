"""Image backbones from timm: any ``timm.create_model`` name, pooled features, layer groups from timm's own
``group_matcher`` (stem first, then blocks/stages), so ``freeze.layers=N`` means the same for a ViT and a ResNet.

Weights trained elsewhere (``model.init=timm``, ``model.init=file:<path>``) expect their images as they were
trained on: ``preprocessing`` carries timm's pretrained config for the model (mean, std, input size), which the
datamodule takes in ``use_backbone``."""

from __future__ import annotations

import timm
import torch
from timm.models import group_parameters

from lightning_modules.backbones.base import Backbone
from lightning_modules.backbones.weight_files import load_weight_file
from lightning_modules.config.library import library_error
from lightning_modules.core.errors import ConfigError
from lightning_modules.core.locations import is_file_init

PREPROCESS_KEYS = ("mean", "std", "input_size")  # model.<key> overrides the weights' pretrained config


class TimmBackbone(Backbone):
    """Wraps ``timm.create_model(name, num_classes=0, **kwargs)``; reads ``batch["image"]``."""

    modality = "image"
    type = "timm"

    def __init__(self, name: str, kwargs: dict | None = None, pretrained: bool = False):
        self.name, self.kwargs = name, dict(kwargs or {})
        super().__init__(timm.create_model(name, pretrained=pretrained, num_classes=0, **self.kwargs), 0)
        self.num_features = self.model.num_features
        self.preprocessing: dict = {}

    @classmethod
    def from_config(cls, model_cfg: dict, data=None, directory=None) -> TimmBackbone:
        """The backbone ``model`` describes (``name``, ``kwargs``): with timm's pretrained weights for
        ``model.init=timm`` (downloaded), else randomly initialised; ``directory`` (a ``backbone/`` whose weights
        the caller loads next) holds nothing else an image backbone needs. Its ``preprocessing`` follows the
        weights' pretrained config when they come from elsewhere (``timm``, ``file:``)."""
        name, kwargs = model_cfg["name"], dict(model_cfg.get("kwargs") or {})
        init = str(model_cfg.get("init", "none"))
        try:
            backbone = cls(name, kwargs, pretrained=init == "timm")
        except Exception as err:
            if isinstance(err, RuntimeError) and "Unknown model" in str(err):
                raise ConfigError(f"model.name={name} is not a timm model (see timm.list_models())") from err
            if init == "timm" and not isinstance(err, TypeError):
                raise  # fetching the pretrained weights: handoff.build_backbone says what failed
            # timm (or torch) refusing a keyword argument: its message, naming the key
            raise library_error("model", {"name": name, "kwargs": kwargs}, err, f"model.kwargs for {name}") from err
        overrides = {k: model_cfg.get(k) for k in PREPROCESS_KEYS if model_cfg.get(k) is not None}
        backbone.set_preprocessing(overrides, from_weights=init == "timm" or is_file_init(init))
        return backbone

    def set_preprocessing(self, overrides: dict | None = None, from_weights: bool = False) -> None:
        """What images this backbone takes: with ``from_weights`` (weights trained elsewhere), timm's pretrained
        config for ``model.name`` (mean, std, input size); ``overrides`` (``model.mean/std/input_size``) win.
        A model with one input channel (its first conv summed over RGB, see weight_files) gets the mean of the
        RGB means and stds. Empty: the datamodule keeps its own image size and statistics, as for weights
        pretune trained on that data."""
        pre = {}
        if from_weights:
            cfg = self.model.pretrained_cfg or {}
            pre = {"mean": cfg.get("mean"), "std": cfg.get("std"), "input_size": (cfg.get("input_size") or [None])[-1]}
        pre.update(overrides or {})
        channels = self.kwargs.get("in_chans", 3)
        for key in ("mean", "std"):
            values = pre.get(key)
            if values is not None and len(values) != channels:
                if len(values) == 3 and channels == 1:
                    values = [sum(values) / 3]
                else:
                    raise ConfigError(
                        f"model.{key}={list(values)} has {len(values)} values for {channels} input channels"
                    )
            if values is not None:
                pre[key] = [float(v) for v in values]
        self.preprocessing = {k: v for k, v in pre.items() if v is not None}

    def load_weight_file(self, path, init_map, init: str) -> list[str]:
        """``model.init=file:<path>``: the file's tensors into ``self.model`` (see weight_files)."""
        return load_weight_file(self, path, init_map, init)

    @staticmethod
    def spec_of(model_cfg: dict, saved: dict | None = None) -> dict:
        """The spec a model config asks for, to compare with a saved backbone's (``saved``, unused here)."""
        return {"type": "timm", "name": model_cfg["name"], "kwargs": dict(model_cfg.get("kwargs") or {})}

    @property
    def spec(self) -> dict:
        return {"type": self.type, "name": self.name, "kwargs": self.kwargs}

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(batch["image"])

    def tokens(self, batch: dict) -> torch.Tensor:
        return self.model.forward_features(batch["image"])

    def grouped_parameter_names(self) -> list[tuple[str | None, list[str]]]:
        grouped = list(group_parameters(self.model, self.model.group_matcher(coarse=True)).values())
        return [("stem" if i == 0 else None, names) for i, names in enumerate(grouped)]
