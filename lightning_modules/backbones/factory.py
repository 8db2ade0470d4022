"""From a ``model`` config to a backbone: the class its ``_target_`` names (pretune's ``TimmBackbone``,
``TransformersBackbone``, ``DualEncoder``, or a ``Backbone`` subclass of the user's own), built with
``cls.from_config(model_cfg, data, directory=...)`` and initialised as ``model.init`` says (random, timm's
pretrained weights, a pre-training run's ``backbone/``, a weight file, a Hugging Face model).

Unlike the other components, a backbone is not built by Hydra's ``instantiate`` with the config's keys as keyword
arguments: ``from_config`` takes the whole model config as a dict (a dual encoder's towers are model configs
inside it, a text backbone needs the datamodule's texts, a saved ``backbone/`` its directory)."""

from __future__ import annotations

import importlib
from pathlib import Path

from pytorch_lightning.utilities import rank_zero_info

from lightning_modules.backbones.base import Backbone
from lightning_modules.backbones.handoff import (
    load_backbone_weights,
    read_backbone_config,
    resolve_init,
    spec_differences,
)
from lightning_modules.config.modalities import backbone_target
from lightning_modules.core.errors import ConfigError, message_of
from lightning_modules.core.locations import CONFIG, WEIGHTS, is_file_init


def backbone_class(model_cfg: dict) -> type[Backbone]:
    """The Backbone class a model config builds (``backbone_target``: its ``_target_``, or the transformers
    family for ``model.init=hf:``), imported; one line when it cannot be, or is no Backbone."""
    target = backbone_target(model_cfg)
    if target is None:
        raise ConfigError("model._target_ is required: the Backbone class to build, e.g. mypkg.MyBackbone")
    module, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except Exception as err:  # what importing it says: no such module, an error in it, no such class
        raise ConfigError(
            f"model._target_={target}: cannot be imported ({type(err).__name__}: {message_of(err)})"
        ) from err
    if not (isinstance(cls, type) and issubclass(cls, Backbone)):
        raise ConfigError(
            f"model._target_={target} is not a Backbone: allowed is a subclass of"
            " lightning_modules.backbones.base.Backbone (from_config, spec_of, spec, forward, grouped_parameter_names)"
        )
    return cls


def build_backbone(model_cfg: dict, data=None, source: dict | None = None):
    """Build the backbone ``model`` describes and initialise it as ``model.init`` says (from ``source`` when the
    run already resolved it: ``handoff.resolve_init``). ``data``: the datamodule, for a backbone that needs
    something from it to be built (a text backbone trains its tokenizer on its texts)."""
    cls = backbone_class(model_cfg)
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
        raise ConfigError(
            f"model.init={init}: a weight file loads into a backbone that maps one onto itself (a timm model), not"
            f" {cls.__name__}"
        )
    backbone = cls.from_config(model_cfg, data)
    notes = backbone.load_weight_file(path, model_cfg.get("init_map"), init)
    for note in notes:
        rank_zero_info(f"model.init={init}: {note}")
    return backbone
