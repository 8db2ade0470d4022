"""Backbone: a timm model that maps inputs to pooled features and knows its ordered layer groups.

Layer groups come from timm's own ``group_matcher`` (stem first, then blocks/stages), so
``freeze.layers=N`` means the same for a ViT and a ResNet. One function, ``layer_groups``,
serves freezing (and later gradual unfreezing and layer-wise LR decay).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import timm
import torch
from timm.models import group_parameters
from torch import nn


@dataclass
class LayerGroup:
    name: str
    params: dict[str, nn.Parameter] = field(default_factory=dict)
    # Modules all of whose parameters lie in this group (set to eval mode when frozen).
    modules: list[nn.Module] = field(default_factory=list)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params.values())


def _group_name(index: int, names: list[str]) -> str:
    if index == 0:
        return "stem"
    prefixes = []
    for n in names:
        parts = n.split(".")
        prefix = ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]
        if prefix not in prefixes:
            prefixes.append(prefix)
    return "+".join(prefixes)


class Backbone(nn.Module):
    """Wraps ``timm.create_model(name, num_classes=0, **kwargs)``; ``forward`` returns pooled features."""

    def __init__(self, name: str, kwargs: dict | None = None, pretrained: bool = False):
        super().__init__()
        self.name, self.kwargs = name, dict(kwargs or {})
        self.model = timm.create_model(name, pretrained=pretrained, num_classes=0, **self.kwargs)
        self.num_features = self.model.num_features

    @property
    def spec(self) -> dict:
        """What is needed to rebuild this architecture (saved next to exported weights)."""
        return {"name": self.name, "kwargs": self.kwargs}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def layer_groups(self) -> list[LayerGroup]:
        """Ordered layer groups, input side first, from timm's group matcher."""
        named = dict(self.model.named_parameters())
        grouped = group_parameters(self.model, self.model.group_matcher(coarse=True))
        groups = [
            LayerGroup(_group_name(i, names), {n: named[n] for n in names})
            for i, names in enumerate(grouped.values())
        ]
        owner = {id(p): i for i, g in enumerate(groups) for p in g.params.values()}
        for module in self.model.modules():
            ids = {owner.get(id(p)) for p in module.parameters()}
            if len(ids) == 1 and None not in ids and module is not self.model:
                groups[ids.pop()].modules.append(module)
        return groups
