"""The backbone contract, written once: every backbone (a timm image model, a transformers text model, ...)
answers it, and freezing, layer-wise LR decay, L2-SP, forgetting, the hand-off and the objectives use
nothing else.

A backbone
- reads its own entries of a batch dict (``modality``: ``image`` reads ``batch["image"]``; ``text`` reads
  ``batch["input_ids"]`` and ``batch["attention_mask"]``) and returns pooled features ``(B, num_features)``
  from ``forward(batch)``, or per-position features ``(B, T, num_features)`` from ``tokens(batch)``;
- knows its ordered *layer groups*, input side first (``layer_groups()``): ``freeze.layers=N`` counts them;
- describes its architecture as a plain dict (``spec``: its ``type`` and the arguments that rebuild it), which
  the hand-off saves next to the weights and compares with the model config;
- keeps the library model as ``self.model``, whose state dict is the exported weights, and whatever turns
  raw input into tensors (``processor``: a tokenizer for text, None for images), saved with the weights;
- says what its inputs should look like when its weights expect it (``preprocessing``: for images ``mean``,
  ``std`` per channel and ``input_size``, from the weights' pretrained config; empty: the data's own), which
  the datamodule takes in ``use_backbone``;
- answers a batch that already carries its pooled ``features`` (computed once for a backbone frozen for the
  whole run, ``callbacks/feature_cache.py``) with those, without running.
- may be made of *towers* (``towers()``: a dual encoder's ``image`` and ``text`` backbones), each a backbone
  of its own: its layer groups are a stack of their own (``tower_groups()``), so freezing and layer-wise LR
  decay count each tower from its own input side, and the hand-off exports each tower as its own backbone.
- can leave pretune as a classifier (``save_classifier``): its library model with a linear head on its pooled
  features, written as its library's own classifier (timm's Hugging Face Hub layout, a transformers model folder),
  which that library loads without pretune; ``load_classifier`` reads it back for ``scripts/predict.py`` and
  ``scripts/export.py``. A family without such a format (a user's own backbone that does not opt in) says so in
  one line, and the run goes on without ``model/``.

Subclasses say how their parameters fall into groups (``grouped_parameter_names``); one function here turns
that into ``LayerGroup``s, the same way for every kind of model.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from lightning_modules.core.errors import ConfigError

FEATURES = "features"  # the batch entry holding a frozen backbone's pooled features, when cached


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
    """Base class: ``self.model`` is the wrapped library model, ``num_features`` the pooled width."""

    modality: ClassVar[str]  # the batch entries it reads: "image", "text" or "image_text" (a dual encoder)
    type: ClassVar[str]  # the family's name: a spec's "type" (backbone/config.yaml), compared when weights load
    preprocessing: dict = {}  # what its weights expect of an input (images: mean, std, input_size); {}: nothing

    def __init__(self, model: nn.Module, num_features: int):
        super().__init__()
        self.model = model
        self.num_features = int(num_features)

    def __call__(self, batch, *args, **kwargs):
        if isinstance(batch, dict) and FEATURES in batch:  # precomputed by the feature cache: nothing to run
            return batch[FEATURES]
        return super().__call__(batch, *args, **kwargs)

    # --- what a subclass provides ---------------------------------------------------------------------
    @classmethod
    def from_config(cls, model_cfg: dict, data=None, directory=None) -> Backbone:
        """The backbone the ``model`` config describes, as ``handoff.build_backbone`` builds it: ``data`` is the
        datamodule (a text backbone from scratch trains its tokenizer on its texts), ``directory`` a
        ``backbone/`` whose processor to load (the caller loads its weights next)."""
        raise NotImplementedError

    @staticmethod
    def spec_of(model_cfg: dict, saved: dict | None = None) -> dict:
        """The spec the ``model`` config asks for, compared with ``saved`` (a ``backbone/config.yaml``) before
        its weights are loaded; ``saved`` lets a backbone whose architecture travels with it say so."""
        raise NotImplementedError

    def forward(self, batch: dict) -> torch.Tensor:
        """Pooled features ``(B, num_features)``."""
        raise NotImplementedError

    def tokens(self, batch: dict) -> torch.Tensor:
        """Per-position features ``(B, T, num_features)`` (patches or tokens), for objectives that need them."""
        raise NotImplementedError

    @property
    def spec(self) -> dict:
        """What rebuilds this architecture: ``{"type": ..., <arguments>}``, saved next to exported weights."""
        raise NotImplementedError

    def grouped_parameter_names(self) -> list[tuple[str | None, list[str]]]:
        """The parameter names of ``self.model`` per layer group, input side first, each with a name for the
        group (None: named after the modules that lie wholly in it)."""
        raise NotImplementedError

    @property
    def processor(self):
        """What turns raw input into this backbone's tensors (a tokenizer), or None."""
        return None

    def save_processor(self, directory: Path, preprocessing: dict | None = None) -> None:
        """Write the processor's files into ``directory`` (next to the weights), and what the family's own library
        needs to load the weights there (``preprocessing``: the data's, see ``datamodules/base.py``); nothing for a
        backbone without."""

    def save_classifier(self, head: nn.Linear, directory: Path, labels: list[str], preprocessing: dict) -> None:
        """Write ``self.model`` with ``head`` (a linear layer on the pooled features) as the family's own classifier
        into the existing, empty ``directory``: its weights, the class names in label order and the evaluation
        ``preprocessing``, in a form the family's library loads without pretune, giving the logits pretune gives."""
        raise ConfigError(
            f"{type(self).__name__} has no classifier format of its own (it does not implement"
            " Backbone.save_classifier), so model/ is not written; its weights are in checkpoints/best.ckpt"
        )

    @classmethod
    def load_classifier(cls, directory: Path) -> nn.Module:
        """What ``save_classifier`` wrote, as a module from a batch dict (this family's entries) to logits; its
        ``processor`` turns raw input into those entries (a tokenizer; None for images)."""
        raise ConfigError(f"{directory}: {cls.__name__} cannot read a classifier back (Backbone.load_classifier)")

    def towers(self) -> dict[str, Backbone]:
        """The backbones this one is made of, by name (a dual encoder: ``image`` and ``text``); none for a
        backbone of one piece."""
        return {}

    # --- shared --------------------------------------------------------------------------------------
    def tower_groups(self) -> dict[str, list[LayerGroup]]:
        """The layer groups of each tower, input side first, by tower name; a backbone of one piece is one
        tower named ``""``. A tower's groups are named ``<tower>/<group>`` (``image/stem``, ``text/embeddings``)."""
        groups = self.layer_groups()
        if not self.towers():
            return {"": groups}
        return {name: [g for g in groups if g.name.startswith(f"{name}/")] for name in self.towers()}

    def layer_groups(self) -> list[LayerGroup]:
        """Ordered layer groups, input side first. Called at every epoch start (freezing), so it walks the
        parameter names once instead of every module's parameters."""
        named_groups = self.grouped_parameter_names()
        grouped = [names for _, names in named_groups]
        named = dict(self.model.named_parameters())
        owner = _owners(grouped)
        modules = dict(self.model.named_modules())
        groups = []
        for i, (label, names) in enumerate(named_groups):
            inside = [m for n, m in modules.items() if n and owner.get(n) == i]
            name = label or _group_name(i, names, modules, owner)
            groups.append(LayerGroup(name, {n: named[n] for n in names}, inside))
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
    """The shortest module paths that lie wholly in the group (``blocks.3+norm`` for a ViT, ``layer2`` for a
    ResNet, ``encoder.layer.0`` for BERT)."""
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


@contextmanager
def evaluating(module: nn.Module):
    """``module`` in eval mode inside (dropout off), each submodule's own mode restored after: a frozen group stays
    in the eval mode its freezing set, the rest as training left it."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.train(mode)
