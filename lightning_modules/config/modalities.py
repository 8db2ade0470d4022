"""Which inputs each component takes, answered before torch is imported: a mismatch (``objective=mae
datamodule=<text>``, ``datamodule=text_classification model=resnet_micro``) is one line at once.

Nothing is restated here: the classes a config names by ``_target_`` declare it (``Backbone.modality``,
``DualEncoder.TOWERS``, ``TransformersBackbone.ARCH_KINDS``, ``PretuneDataModule.modality``,
``Objective.modalities``, ``Objective.text_kind``, ``Objective.pretrain_only``), and ``config/classes.py`` reads
those declarations from their source without importing them. A class whose source cannot tell (a user's class
made at run time, a value that is not a literal) is left to check itself when it is built, as the shipped classes
also do when built from Python.
"""

from __future__ import annotations

import functools
import re
from contextlib import contextmanager

from omegaconf import DictConfig, OmegaConf

from lightning_modules.config.classes import class_attribute
from lightning_modules.core.errors import ConfigError, show
from lightning_modules.core.locations import CONF

TRANSFORMERS = "lightning_modules.backbones.text.TransformersBackbone"  # what model.init=hf:... always builds
KIND_WORDS = {"encoder": "a BERT-style encoder", "decoder": "a GPT-style decoder"}
KIND_OBJECTIVES = {"encoder": "objective=mlm", "decoder": "objective=clm"}


def backbone_target(model) -> str | None:
    """The Backbone class a model config builds: ``model.init=hf:...`` is always a transformers model, whatever
    the preset, so ``model=`` can be left out for a Hugging Face model; else its ``_target_`` (None if unset, or
    a reference that cannot be resolved: check_values names it)."""
    if str(_get(model, "init", "none")).startswith("hf:"):
        return TRANSFORMERS
    target = _get(model, "_target_")
    return target if isinstance(target, str) else None


def _get(model, key: str, default=None):
    try:
        return model.get(key, default)
    except Exception:  # omegaconf's InterpolationResolutionError and kin
        return None


def tower_names(model) -> dict:
    """{tower name (its key under model): the modality it must have} of a backbone made of towers (a dual
    encoder's ``TOWERS``); empty for a backbone of one piece, or one whose class cannot tell."""
    towers = class_attribute(backbone_target(model), "TOWERS")
    return towers if isinstance(towers, dict) else {}


def towers_of(model) -> dict:
    """The tower configs of a backbone made of towers (``model.image``, ``model.text`` of a dual encoder), by
    name; empty for a backbone of one piece."""
    return {name: model[name] for name in tower_names(model) if model.get(name) is not None}


@contextmanager
def tower_errors(name: str, tower_cfg):
    """A tower is built and checked by code that names its keys ``model.<key>``; a mistake in it names
    ``model.<tower>.<key>``. Only the tower config's own keys are rewritten (``model.safetensors`` in a message
    is a file, not a key)."""
    keys = "|".join(re.escape(str(k)) for k in sorted(tower_cfg, key=len, reverse=True))
    try:
        yield
    except ConfigError as err:
        if not keys:
            raise
        message = re.sub(rf"(?<![\w/.])model\.(?=(?:{keys})\b)", f"model.{name}.", str(err))
        raise ConfigError(message) from err


def model_modality(model) -> str | None:
    """The inputs the backbone a model config builds takes (``image``, ``text``, ``image_text``); None when its
    class cannot tell."""
    return class_attribute(backbone_target(model), "modality")


def _select(cfg: DictConfig, key: str):
    """The value at ``key``, None when it is not there or cannot be resolved (check_values names that)."""
    try:
        return OmegaConf.select(cfg, key, default=None)
    except Exception:  # omegaconf's InterpolationResolutionError and kin
        return None


def _modalities(target) -> tuple | None:
    found = class_attribute(target, "modalities")
    return (found,) if isinstance(found, str) else tuple(found) if isinstance(found, (list, tuple)) else None


def choice_name(cfg: DictConfig, group: str) -> str:
    """How the user named a component: ``datamodule=digits`` (Hydra's choice), else (or when the choice's class
    was overridden, ``model._target_=mypkg.Net``) its class."""
    from hydra.core.hydra_config import HydraConfig

    init = str(_select(cfg, "model.init"))
    if group == "model" and init.startswith("hf:"):
        return f"model.init={init}"
    target = _select(cfg, f"{group}._target_")
    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get(group)
        if choice:  # the choice, unless its class was overridden (a preset of the user's own config dir: its own)
            preset = _preset_target(group, choice)
            return f"{group}={choice}" if target is None or preset in (None, target) else f"{group}._target_={target}"
    target = target or _select(cfg, f"{group}.name")
    return f"{group} {str(target).rsplit('.', 1)[-1]}"


@functools.cache
def _preset_target(group: str, choice: str):
    """The ``_target_`` of pretune's ``conf/<group>/<choice>.yaml`` (None for a choice not shipped there)."""
    path = CONF / group / f"{choice}.yaml"
    return OmegaConf.load(path).get("_target_") if path.is_file() else None


# scripts/evaluate.py task -> (the model's modality, the datamodule's modality) it takes
EVALUATIONS = {"zero_shot": ("image_text", "image"), "retrieval": ("image_text", "image_text")}


def check_modalities(cfg: DictConfig) -> None:
    """The model, the data and the objective take the same inputs. Only ``_target_`` values and a few plain ones
    are read (none resolved that cannot be: this runs before the per-key rules, so a mismatch is named before an
    interpolation it breaks, ``model.kwargs.in_chans=${datamodule.channels}`` on text data)."""
    if _select(cfg, "stage") == "evaluate":
        return _check_evaluation(cfg)
    if _select(cfg, "model") is None:  # predict.py, export.py: the trained model says what it reads, once it is read
        return None
    model = model_modality(cfg.model) if isinstance(_select(cfg, "model"), DictConfig) else None
    data = class_attribute(_select(cfg, "datamodule._target_"), "modality")
    objective_target = _select(cfg, "objective._target_")
    objective = _modalities(objective_target)
    if objective is not None:
        for group, modality in (("model", model), ("datamodule", data)):
            if modality is not None and modality not in objective:
                raise ConfigError(
                    f"{choice_name(cfg, 'objective')} takes {' or '.join(objective)} inputs, but"
                    f" {choice_name(cfg, group)} is {modality}; pick a {'/'.join(objective)} {group}"
                )
    if data is not None and model is not None and model != data:
        raise ConfigError(
            f"{choice_name(cfg, 'model')} takes {model} inputs, but {choice_name(cfg, 'datamodule')} gives {data}"
        )
    _check_text_kind(cfg, objective_target)
    if class_attribute(objective_target, "pretrain_only") is True and _select(cfg, "stage") == "finetune":
        raise ConfigError(pretrain_only(choice_name(cfg, "objective")))


def pretrain_only(objective: str) -> str:
    """The line for a pre-training objective in a fine-tune (``Objective.pretrain_only``), here and at run time."""
    return (
        f"{objective} is a pre-training objective: run it with scripts/pretrain.py (lock a tower there with"
        " freeze.image=all or freeze.text=all); fine-tune one tower with scripts/finetune.py"
        " model.init=<run>/backbone/image (or backbone/text)"
    )


def _check_evaluation(cfg: DictConfig) -> None:
    task = _select(cfg, "task")
    if task not in EVALUATIONS:
        raise ConfigError(f"task={task!r} is invalid: allowed are {', '.join(repr(t) for t in EVALUATIONS)}")
    need_model, need_data = EVALUATIONS[task]
    model = model_modality(cfg.model) if isinstance(_select(cfg, "model"), DictConfig) else None
    if model is not None and model != need_model:
        raise ConfigError(
            f"task={task} evaluates an image–text model (a CLIP pre-training run, model=clip_micro), but"
            f" {choice_name(cfg, 'model')} is {model}"
        )
    data = class_attribute(_select(cfg, "datamodule._target_"), "modality")
    if data is not None and data != need_data:
        example = "datamodule=digits, mnist5k or image_folder" if need_data == "image" else "datamodule=image_text"
        raise ConfigError(
            f"task={task} takes {need_data} data ({example}), but {choice_name(cfg, 'datamodule')} gives {data}"
        )
    init = _select(cfg, "model.init")
    if str(init) in ("none", "timm"):
        raise ConfigError(
            f"model.init={init}: task={task} evaluates a pre-trained model; allowed is a CLIP pre-training run dir"
            " (or its backbone/ dir)"
        )


def _named(model, prefix: str) -> str:
    """How a model config names its class in a line: ``model.init=hf:...`` or ``model._target_=...``."""
    init = str(model.get("init", "none"))
    return f"{prefix}.init={init}" if init.startswith("hf:") else f"{prefix}._target_={model.get('_target_')}"


def preset_targets() -> dict[str, str]:
    """The shipped model presets (``conf/model/<name>.yaml``) by name -> the Backbone class each builds."""
    return {path.stem: _preset_target("model", path.stem) for path in sorted((CONF / "model").glob("*.yaml"))}


def presets(modality: str) -> list[str]:
    """The shipped model presets whose class takes ``modality`` and is made of one piece."""
    targets = preset_targets()
    return [
        name
        for name, target in targets.items()
        if class_attribute(target, "modality") == modality and not class_attribute(target, "TOWERS")
    ]


def check_towers(model) -> None:
    """Each tower of a dual encoder is a backbone of the modality its place asks for; freeze.<tower> needs the
    tower. A model config names its class (``model._target_``), unless ``model.init=hf:`` does."""
    if "_target_" not in model and backbone_target(model) is None:
        raise ConfigError(
            "model._target_ is required: the Backbone class to build, e.g."
            " lightning_modules.backbones.image.TimmBackbone (model=<a preset> sets it)"
        )
    for name, modality in tower_names(model).items():
        tower = model.get(name)
        if tower is None or not hasattr(tower, "get"):
            raise ConfigError(
                f"model.{name} is required for model._target_={backbone_target(model)}: a {modality} backbone"
            )
        target = backbone_target(tower)
        if target is None:
            raise ConfigError(
                f"model.{name}._target_={show(_get(tower, '_target_'))} is invalid: allowed is the Backbone class of"
                f" the {name} tower (model@model.{name}=<a {modality} preset: {', '.join(presets(modality))}>)"
            )
        kind = class_attribute(target, "modality")
        if class_attribute(target, "TOWERS") or kind is not None and kind != modality:
            allowed = presets(modality)
            raise ConfigError(
                f"{_named(tower, f'model.{name}')} cannot be the {name} tower, which takes {modality} inputs: allowed"
                f" {'is' if len(allowed) == 1 else 'are'} model@model.{name}={', '.join(allowed)} (or a {modality}"
                " backbone class of your own)"
            )
    if tower_names(model) and str(model.get("init", "none")) != "none":
        for name in tower_names(model):
            if str(model[name].get("init", "none")) != "none":
                raise ConfigError(
                    f"model.{name}.init={model[name].get('init')}: model.init={model.get('init')} already loads every"
                    f" tower; allowed is model.{name}.init=none with it"
                )


def _check_text_kind(cfg: DictConfig, objective_target) -> None:
    """MLM on a GPT-style decoder, CLM on a BERT-style encoder: refused here for the architectures a text
    backbone class builds from sizes (``ARCH_KINDS``: model.name -> its kind); a Hugging Face model's kind is
    known once it is loaded, where the objective refuses it with the same line."""
    need = class_attribute(objective_target, "text_kind")
    model = _select(cfg, "model")
    if need is None or not isinstance(model, DictConfig) or str(_select(cfg, "model.init")).startswith("hf:"):
        return
    kinds = class_attribute(_select(cfg, "model._target_"), "ARCH_KINDS")
    kind = kinds.get(_select(cfg, "model.name")) if isinstance(kinds, dict) else None
    if kind is not None and kind != need:
        raise ConfigError(kind_mismatch(choice_name(cfg, "objective"), need, choice_name(cfg, "model"), kind))


def kind_mismatch(objective: str, need: str, model: str, kind: str) -> str:
    return f"{objective} needs {KIND_WORDS[need]}, but {model} is {KIND_WORDS[kind]}; use {KIND_OBJECTIVES[kind]}"
