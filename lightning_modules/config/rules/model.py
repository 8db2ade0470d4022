"""``model.*`` (``conf/model/``): the backbone's class (``model._target_``) and name, where its weights come from
(``model.init``), how weights trained elsewhere map onto it and what images they expect, a text backbone's sizes;
a dual encoder's towers (``model.image.*``, ``model.text.*``) are model configs of their own and take the same
rules. A backbone class of the user's own reads keys of its own, which need no rule here."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from contextlib import nullcontext

from lightning_modules.config.classes import class_attribute
from lightning_modules.config.kinds import (
    TARGET,
    WIDTH,
    Choice,
    Custom,
    Flag,
    Rule,
    Section,
    Text,
    Together,
    invalid,
    is_number,
)
from lightning_modules.config.library import OWN
from lightning_modules.config.modalities import preset_targets, tower_errors
from lightning_modules.core.errors import ConfigError, show
from lightning_modules.core.locations import find_backbone_dir, hf_local_dir, tokenizer_dir, weight_file_path

INIT = (
    "none, timm, file:<weights>, hf:<model dir or hub name>, wandb:<entity>/<project>/<name>:<alias>,"
    " a run dir or a backbone/ dir"
)
INIT_MAP_KEYS = ({"strip"}, {"drop"}, {"regex", "replace"})
INIT_MAP_ALLOWED = (
    "allowed is null, positional, or a list of rules"
    " {strip: <prefix>}, {drop: <regex>}, {regex: <regex>, replace: <text>}"
)


def check_init_map(init_map) -> list[dict] | str | None:
    """``model.init_map`` checked for its form: null, ``positional`` or a list of rename rules (applied to a weight
    file's keys by ``backbones/weight_files.py``)."""
    if init_map is None or init_map == "positional":
        return init_map
    if isinstance(init_map, (str, dict)) or not hasattr(init_map, "__iter__"):
        raise ConfigError(f"model.init_map={init_map!r} is invalid: {INIT_MAP_ALLOWED}")
    rules = []
    for rule in init_map:
        rule = dict(rule) if hasattr(rule, "keys") else rule
        if (
            not isinstance(rule, dict)
            or set(rule) not in INIT_MAP_KEYS
            or not all(isinstance(v, str) for v in rule.values())
        ):
            raise ConfigError(f"model.init_map rule {rule!r} is invalid: {INIT_MAP_ALLOWED}")
        pattern = rule.get("drop", rule.get("regex"))
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(
                    f"model.init_map rule {rule!r}: {pattern!r} is not a regular expression ({err})"
                ) from err
        rules.append(rule)
    return rules


def _as_key(key: str):
    """Checks that name the model's own keys (``model.init_map=...``) run for ``key``: for a tower's key
    (``model.text.init_map``) their lines name the tower's (modalities.tower_errors); else nothing changes."""
    parts = key.split(".")
    return tower_errors(parts[1], {parts[2]: None}) if len(parts) == 3 else nullcontext()


def _check_init_map(key: str, value):
    with _as_key(key):
        check_init_map(value)
    return value


def _check_preprocessing(key: str, value):
    """model.mean / model.std: null, or a list of numbers (std > 0), one per input channel or RGB."""
    if value is None:
        return value
    numbers = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
    positive = key.endswith("std")
    if not numbers or not all(is_number(v) and math.isfinite(v) and (v > 0 or not positive) for v in numbers):
        allowed = "a list of numbers > 0" if positive else "a list of numbers"
        raise ConfigError(f"{key}={show(value)} is invalid: allowed is null or {allowed}, one per channel")
    return value


BACKBONE_CLASS = Text(TARGET.pattern, "a dotted path to a Backbone class, e.g. mypkg.backbones.MyBackbone")


def _check_target(key: str, value):
    """model._target_ (and a tower's): the Backbone class to build, a dotted path. One of pretune's own is read
    from its source (it must declare the inputs it takes); a class of the user's own is imported, and checked to
    be a Backbone, only when the run builds it (backbones/factory.py): importing it here would import torch."""
    BACKBONE_CLASS.check(key, value)
    if value.startswith(OWN) and class_attribute(value, "modality") is None:
        shipped = sorted(set(preset_targets().values()))
        raise ConfigError(f"{key}={value} is not one of pretune's backbones: allowed are {', '.join(shipped)}")
    return value


def _check_init(key: str, value):
    """model.init (and a tower's, model.<tower>.init): none, timm, a W&B artifact (fetched when the run starts:
    only its form is checked here), or a directory holding a backbone/ (found here, so a typo fails at once)."""
    if not isinstance(value, str) or not value:
        raise invalid(key, value, INIT)
    with _as_key(key):
        _check_init_source("model.init", value)
    return value


def _check_init_source(key: str, value: str) -> None:
    """What model.init names is there (its form, for a W&B artifact fetched when the run starts)."""
    if value.startswith("wandb:"):
        if value.count("/") != 2 or ":" not in value.removeprefix("wandb:"):
            raise ConfigError(f"{key}={value} is invalid: allowed is wandb:<entity>/<project>/<name>:<alias>")
    elif value.startswith("file:"):  # a weight file (safetensors, .pth ...): the form, and that it is there
        weight_file_path(value)
    elif value.startswith("hf:"):  # a local model dir, or a hub name (not when offline, unless cached)
        hf_local_dir(value.removeprefix("hf:"))
    elif value not in ("none", "timm"):
        try:
            find_backbone_dir(value)  # raises a ConfigError naming model.init when there is nothing there
        except OSError as err:  # e.g. a name too long for the file system
            raise ConfigError(f"{key}={value}: {err.strerror or err}") from None


def _check_tokenizer(key: str, value):
    """model.tokenizer: null (trained on the data), or the backbone whose tokenizer a scratch run takes."""
    if value is None:
        return value
    if not isinstance(value, str) or not value.strip():
        raise invalid(key, value, "null, a pre-training run dir, a backbone/ dir or hf:<model>")
    with _as_key(key):
        tokenizer_dir(value)  # raises a ConfigError naming model.tokenizer when there is nothing there
    return value


RULES: dict[str, object] = {
    "model._target_": Custom(_check_target, BACKBONE_CLASS.what),
    "model.name": Text(r"[\w.\-/]+", "a model name, e.g. resnet18 or vit_tiny_patch16_224"),
    "model.init": Custom(_check_init, INIT),
    "model.compile": Flag(),
    "model.channels_last": Choice("auto", True, False),
    "model.kwargs": Section(),
    # weights trained elsewhere (model.init=timm, file:): which tensor goes where, and their preprocessing
    "model.init_map": Custom(_check_init_map, "null, positional or a list of rules (see weight_files.py)"),
    "model.input_size": Rule(int, low=4, nullable=True),  # null: the weights' pretrained input size, or the data's
    "model.mean": Custom(_check_preprocessing, "null or a list of numbers, one per channel"),  # null: the weights'
    "model.std": Custom(_check_preprocessing, "null or a list of numbers > 0, one per channel"),
    # text backbones built from scratch (model=bert_micro, gpt_micro)
    "model.layers": Rule(int, low=1, high=1024),
    "model.hidden": WIDTH,
    "model.heads": Rule(int, low=1, high=1024),
    "model.intermediate": WIDTH,
    "model.max_positions": Rule(int, low=4, high=1 << 20),
    "model.vocab_size": Rule(int, low=300, high=1 << 22),  # byte-level BPE alone starts from 256 byte tokens
    "model.dropout": Rule(float, low=0, high=1, high_open=True),
    "model.pooling": Choice("cls", "mean", "last"),
    "model.tokenizer": Custom(_check_tokenizer, "null, a pre-training run dir, a backbone/ dir or hf:<model>"),
}
# A dual encoder's towers are model configs of their own: model.image.* any timm preset's keys, model.text.* any
# text preset's (model@model.image=resnet_micro puts resnet_micro's keys there).
TOWER_KEYS = {
    "image": ("_target_", "name", "init", "compile", "channels_last", "init_map", "input_size", "mean", "std"),
    "text": ("_target_", "name", "init", "compile", "layers", "hidden", "heads", "intermediate", "max_positions")
    + ("vocab_size", "dropout", "pooling", "tokenizer"),
}
RULES |= {f"model.{tower}.{key}": RULES[f"model.{key}"] for tower, names in TOWER_KEYS.items() for key in names}

PASSED_THROUGH = {
    "model.kwargs": "timm.create_model's keyword arguments",
    "model.image.kwargs": "timm.create_model's keyword arguments (a dual encoder's image tower)",
}

TOGETHER = [
    Together(
        ("model.tokenizer", "model.init"),
        lambda tokenizer, init: tokenizer is None or init == "none",
        "model.tokenizer is for a backbone built from scratch (model.init=none); a pre-trained one brings its own",
    ),
    # the model must take the data (a key here may be one passed through: timm's kwargs)
    Together(
        ("model.kwargs.in_chans", "datamodule.channels"),
        lambda model, data: model == data,
        "the model's input channels must be the data's (leave model.kwargs.in_chans at ${datamodule.channels})",
    ),
    Together(
        ("model.kwargs.img_size", "datamodule.image_size"),
        lambda model, data: model == data,
        "the model's image size must be the data's (leave model.kwargs.img_size at ${datamodule.image_size})",
    ),
]
