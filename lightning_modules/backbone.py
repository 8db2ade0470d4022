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
        """Ordered layer groups, input side first, from timm's group matcher. Called at every epoch start
        (freezing), so it walks the parameter names once instead of every module's parameters."""
        named = dict(self.model.named_parameters())
        grouped = list(group_parameters(self.model, self.model.group_matcher(coarse=True)).values())
        owner = _owners(grouped)
        modules = dict(self.model.named_modules())
        groups = []
        for i, names in enumerate(grouped):
            inside = [m for n, m in modules.items() if n and owner.get(n) == i]
            groups.append(LayerGroup(_group_name(i, names, modules, owner), {n: named[n] for n in names}, inside))
        return groups


def _owners(grouped: list[list[str]]) -> dict[str, int | None]:
    """For every parameter and module path: the group that holds all of its parameters, or None if they
    span groups. A module that holds no parameters has no entry."""
    sets: dict[str, set[int]] = {}
    for i, names in enumerate(grouped):
        for name in names:
            pieces = name.split(".")
            for depth in range(1, len(pieces) + 1):
                sets.setdefault(".".join(pieces[:depth]), set()).add(i)
    return {path: ids.pop() if len(ids) == 1 else None for path, ids in sets.items()}


def _group_name(index: int, names: list[str], modules: dict, owner: dict) -> str:
    """``stem`` for the first group, else the shortest module paths that lie wholly in the group
    (``blocks.3+norm`` for a ViT, ``layer2`` for a ResNet)."""
    if index == 0:
        return "stem"
    parts = []
    for name in names:
        pieces = name.split(".")
        for depth in range(1, len(pieces)):
            prefix = ".".join(pieces[:depth])
            if prefix in modules and owner.get(prefix) == index:
                break
        else:
            prefix = name  # a parameter held directly by a module that spans groups
        if prefix not in parts:
            parts.append(prefix)
    return "+".join(parts)
