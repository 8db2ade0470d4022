"""Image backbones from timm: any ``timm.create_model`` name, pooled features, layer groups from timm's own
``group_matcher`` (stem first, then blocks/stages), so ``freeze.layers=N`` means the same for a ViT and a ResNet."""

from __future__ import annotations

import timm
import torch
from timm.models import group_parameters

from lightning_modules.backbones.base import Backbone
from lightning_modules.config.errors import ConfigError
from lightning_modules.config.library import library_error


class TimmBackbone(Backbone):
    """Wraps ``timm.create_model(name, num_classes=0, **kwargs)``; reads ``batch["image"]``."""

    modality = "image"
    type = "timm"

    def __init__(self, name: str, kwargs: dict | None = None, pretrained: bool = False):
        self.name, self.kwargs = name, dict(kwargs or {})
        super().__init__(timm.create_model(name, pretrained=pretrained, num_classes=0, **self.kwargs), 0)
        self.num_features = self.model.num_features

    @classmethod
    def from_config(cls, model_cfg: dict, data=None, directory=None) -> TimmBackbone:
        """The backbone ``model`` describes (``name``, ``kwargs``), randomly initialised; ``directory`` (a
        ``backbone/`` whose weights the caller loads next) holds nothing else an image backbone needs."""
        name, kwargs = model_cfg["name"], dict(model_cfg.get("kwargs") or {})
        try:
            return cls(name, kwargs)
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise ConfigError(f"model.name={name} is not a timm model (see timm.list_models())") from err
            raise library_error("model", {"name": name, "kwargs": kwargs}, err, f"model.kwargs for {name}") from err
        except Exception as err:  # timm (or torch) refusing a keyword argument: its message, naming the key
            raise library_error("model", {"name": name, "kwargs": kwargs}, err, f"model.kwargs for {name}") from err

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
