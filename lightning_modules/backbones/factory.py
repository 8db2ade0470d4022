"""From a ``model`` config to a backbone: the class the config names, built and initialised as ``model.init`` says
(random, timm's pretrained weights, a pre-training run's ``backbone/``, a weight file, a Hugging Face model)."""

from __future__ import annotations

import importlib
from pathlib import Path

from pytorch_lightning.utilities import rank_zero_info

from lightning_modules.backbones.handoff import (
    load_backbone_weights,
    read_backbone_config,
    resolve_init,
    spec_differences,
)
from lightning_modules.config.modalities import BACKBONE_TYPES, backbone_type
from lightning_modules.core.errors import ConfigError
from lightning_modules.core.locations import CONFIG, WEIGHTS, is_file_init


def backbone_class(type_: str):
    """The Backbone class ``model.type`` names (imported only when used)."""
    if type_ not in BACKBONE_TYPES:
        raise ConfigError(f"model.type={type_} is unknown: allowed are {sorted(BACKBONE_TYPES)}")
    module, name = BACKBONE_TYPES[type_][0].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def build_backbone(model_cfg: dict, data=None, source: dict | None = None):
    """Build the backbone ``model`` describes and initialise it as ``model.init`` says (from ``source`` when the
    run already resolved it: ``handoff.resolve_init``). ``data``: the datamodule, for a backbone that needs
    something from it to be built (a text backbone trains its tokenizer on its texts)."""
    cls = backbone_class(backbone_type(model_cfg))
    init = str(model_cfg.get("init", "none"))
    if init == "none" or init.startswith("hf:"):  # from scratch, or a Hugging Face model (the class loads it)
        return cls.from_config(model_cfg, data)
    if init == "timm":
        name = model_cfg["name"]
        try:
            return cls.from_config(model_cfg, data)
        except ConfigError:
            raise
        except Exception as err:  # timm/hub raise many types when offline or the weights don't exist
            raise ConfigError(
                f"model.init=timm: could not load timm's pretrained weights for model.name={name}"
                f" ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''});"
                " timm downloads them from the Hugging Face Hub, so this needs internet and a model"
                " name with published weights"
            ) from err
    source = source or resolve_init(init)
    if is_file_init(init):
        return _from_weight_file(cls, model_cfg, data, init, Path(source["path"]))
    backbone_dir = Path(source["path"])
    saved = read_backbone_config(backbone_dir)
    if saved.get("sha256") not in (None, source["sha256"]):
        raise ConfigError(
            f"model.init={init}: {WEIGHTS} is corrupt or truncated (its sha256 is not the one {CONFIG} recorded)"
        )
    wanted = cls.spec_of(model_cfg, saved)
    diffs = spec_differences(saved, wanted)
    if diffs:
        hint = "use the model config it was pre-trained with"
        towers = [t for t in saved.get("towers") or [] if (saved.get(t) or {}).get("type") == wanted.get("type")]
        if towers and wanted.get("type") != saved.get("type"):  # one of its towers is what this model can take
            hint = f"its {' and '.join(towers)} tower is a backbone of its own: model.init={backbone_dir / towers[0]}"
        raise ConfigError(
            f"model.init={init}: the backbone's architecture does not match the model config ("
            + "; ".join(diffs)
            + f"); {hint}"
        )
    backbone = cls.from_config(model_cfg, data, directory=backbone_dir)
    load_backbone_weights(backbone, backbone_dir)
    return backbone


def _from_weight_file(cls, model_cfg: dict, data, init: str, path: Path):
    """``model.init=file:<path>``: the configured backbone with the file's weights (backbones/weight_files.py)."""
    if not hasattr(cls, "load_weight_file"):
        raise ConfigError(f"model.init={init}: a weight file loads into model.type=timm, not {cls.type}")
    backbone = cls.from_config(model_cfg, data)
    notes = backbone.load_weight_file(path, model_cfg.get("init_map"), init)
    for note in notes:
        rank_zero_info(f"model.init={init}: {note}")
    return backbone
