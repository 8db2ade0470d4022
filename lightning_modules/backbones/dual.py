"""An image–text dual encoder (``DualEncoder``, ``model=clip_micro``): two backbones side by side, an image tower
(any image backbone, ``model.image.*``: a timm model) and a text tower (``model.text.*``: BERT-style from a config,
or ``hf:`` pre-trained), as CLIP pairs them. The contrastive objective (``objective=clip``) owns
the projections into the shared embedding space and the temperature; this class is only the two towers.

It answers the backbone contract by delegating to its towers:
- ``forward(batch)`` / ``tokens(batch)``: each tower's features by name (``{"image": (B, Di), "text": (B, Dt)}``),
  each tower reading its own entries of the batch (``image``; ``input_ids``/``attention_mask``);
- ``towers()``: the two backbones; ``layer_groups()``: the image tower's groups, then the text tower's, named
  ``image/<group>`` and ``text/<group>``, so freezing (``freeze.image``, ``freeze.text``), layer-wise LR decay and
  the per-group monitor work per tower through the shared machinery;
- ``spec``: both towers' specs; the hand-off exports the dual encoder (``backbone/``) and each tower as a backbone
  of its own (``backbone/image``, ``backbone/text`` with its tokenizer), which a fine-tune loads like any other.

Each tower is built by ``factory.build_backbone`` from its own config, so it takes every ``init`` its kind takes
(``model.text.init=hf:<dir>``, ``model.image.init=<run>/backbone/image``, ...); ``model.init`` loads a whole dual
encoder (a CLIP pre-training run). A tower's mistake names the tower's keys (``model.text.init=...``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lightning_modules.backbones.base import Backbone
from lightning_modules.backbones.factory import backbone_class, build_backbone
from lightning_modules.config.modalities import tower_errors, towers_of
from lightning_modules.core.errors import ConfigError


class DualEncoder(Backbone):
    """``self.model`` holds the two tower backbones (a ``ModuleDict``: ``image``, ``text``); ``num_features`` is
    each tower's width, by name."""

    modality = "image_text"
    type = "dual_encoder"
    # tower name (its key under model) -> the modality it must have; the config check reads it from this source
    TOWERS = {"image": "image", "text": "text"}

    def __init__(self, image: Backbone, text: Backbone):
        super().__init__(nn.ModuleDict({"image": image, "text": text}), 0)
        for name, tower in self.towers().items():
            if tower.modality != self.TOWERS[name] or tower.towers():
                raise ConfigError(
                    f"model.{name}: a {tower.modality} backbone ({type(tower).__name__}) cannot be the {name} tower;"
                    f" allowed is a {self.TOWERS[name]} backbone"
                )
        self.num_features = {name: tower.num_features for name, tower in self.towers().items()}

    # --- building ------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, model_cfg: dict, data=None, directory=None) -> DualEncoder:
        """Each tower from its own config (``model.image``, ``model.text``) and its own ``init``; with ``directory``
        (a dual encoder's ``backbone/``, whose weights the caller loads next) each tower from its own export in it
        (``backbone/image``, ``backbone/text``: the architecture and the tokenizer it was trained with)."""
        towers = {}
        for name, tower_cfg in towers_of(model_cfg).items():
            with tower_errors(name, tower_cfg):
                if directory is None:
                    towers[name] = build_backbone(tower_cfg, data)
                else:
                    saved = Path(directory) / name
                    tower_cls = backbone_class(tower_cfg)
                    towers[name] = tower_cls.from_config({**tower_cfg, "init": str(saved)}, data, directory=saved)
        return cls(**towers)

    @staticmethod
    def spec_of(model_cfg: dict, saved: dict | None = None) -> dict:
        """Both towers' specs, each as its own class asks for it (compared with a saved dual encoder's, tower by
        tower: ``text.layers``, ``image.kwargs.depth`` ...), and a text tower's pooling: the projection was trained
        on those features, so a dual encoder loads back only with the pooling it was trained with (a tower loaded
        alone, to fine-tune, takes any)."""
        spec = {"type": DualEncoder.type, "name": "dual"}
        for name, tower_cfg in towers_of(model_cfg).items():
            tower_saved = (saved or {}).get(name) if isinstance((saved or {}).get(name), dict) else None
            tower_spec = backbone_class(tower_cfg).spec_of(tower_cfg, tower_saved)
            spec[name] = _with_pooling(tower_spec, tower_cfg.get("pooling"))
        return spec

    @property
    def spec(self) -> dict:
        towers = {name: _with_pooling(t.spec, getattr(t, "pooling", None)) for name, t in self.towers().items()}
        return {"type": self.type, "name": "dual", **towers}

    # --- the contract --------------------------------------------------------------------------------------
    def towers(self) -> dict[str, Backbone]:
        return dict(self.model.items())

    @property
    def image(self) -> Backbone:
        return self.model["image"]

    @property
    def text(self) -> Backbone:
        return self.model["text"]

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Each tower's pooled features, by tower name."""
        return {name: tower(batch) for name, tower in self.model.items()}

    def tokens(self, batch: dict) -> dict[str, torch.Tensor]:
        return {name: tower.tokens(batch) for name, tower in self.model.items()}

    def grouped_parameter_names(self) -> list[tuple[str | None, list[str]]]:
        return [
            (f"{name}/{group.name}", [f"{name}.model.{p}" for p in group.params])
            for name, tower in self.model.items()
            for group in tower.layer_groups()
        ]


def _with_pooling(spec: dict, pooling: str | None) -> dict:
    return spec if pooling is None else {**spec, "pooling": pooling}
