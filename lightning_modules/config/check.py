"""Checks on the composed config that need no heavy import: a bad value fails here, at once,
with one line naming the key, the value and what is allowed."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_modules.config.kinds import Section
from lightning_modules.config.library import OWN
from lightning_modules.config.modalities import (
    check_modalities,
    check_towers,
    choice_name,
    model_modality,
    towers_of,
)
from lightning_modules.config.rules import REQUIRED_GROUPS, RULES, check_together, passed_through, rule_for
from lightning_modules.config.rules.model import TOWER_KEYS
from lightning_modules.core.errors import ConfigError, show
from lightning_modules.core.extras import require
from lightning_modules.core.locations import CONF


def keys(cfg: DictConfig, rules: dict = RULES, prefix: str = "") -> Iterator[str]:
    """Every key of ``cfg`` that is a leaf or has a rule of its own, in the config's order. A rule covers
    everything below its key, except a Section's, whose keys follow it. A list is a leaf."""
    for name in cfg.keys():
        key = f"{prefix}{name}"
        child = cfg._get_node(name)
        rule = rule_for(key, rules)
        section = isinstance(child, DictConfig) and not child._is_none() and not child._is_interpolation()
        if rule is not None:
            yield key
        if section and (rule is None or isinstance(rule, Section)):
            yield from keys(child, rules, f"{key}.")
        elif rule is None:
            yield key


UNKNOWN = object()  # a value only the Hydra app can resolve


def value(cfg: DictConfig, key: str):
    """The resolved value at ``key`` (containers as plain dicts and lists); a reference that cannot be
    resolved is the user's mistake too (``optimizer.lr=${nope}``). UNKNOWN for what only the Hydra app knows."""
    try:
        found = OmegaConf.select(cfg, key, throw_on_missing=True)
        if isinstance(found, (DictConfig, ListConfig)):
            found = OmegaConf.to_container(found, resolve=True)
    except Exception as err:  # omegaconf's InterpolationResolutionError and kin
        if "HydraConfig was not set" in str(err):  # ${hydra:...}, composed outside the Hydra app (a test)
            return UNKNOWN
        raise ConfigError(f"{key}={_raw(cfg, key)} cannot be resolved: {str(err).splitlines()[0]}") from None
    return found


def _parent(cfg: DictConfig, key: str) -> DictConfig:
    parent = key.rpartition(".")[0]
    return OmegaConf.select(cfg, parent) if parent else cfg


def _last(key: str) -> str:
    return key.rpartition(".")[2]


def _raw(cfg: DictConfig, key: str):
    """The value at ``key`` as written, interpolations unresolved."""
    return _parent(cfg, key)._get_node(_last(key))._value()


def _in_component(cfg: DictConfig, key: str) -> bool:
    """Whether ``key`` is an argument of a component built from its ``_target_`` (which refuses an argument it
    does not take). A backbone (the model config, a tower) is built from its whole config (``from_config``),
    which refuses nothing: pretune's own backbones read only keys that have a rule, so under them a key without
    one is a mistake (``+model.nmae=x``); a user's backbone class reads keys of its own."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):  # the innermost component holds the key
        node = OmegaConf.select(cfg, ".".join(parts[:i]), default=None)
        if isinstance(node, DictConfig) and "_target_" in node:
            target = node._get_node("_target_")._value()
            return not (parts[0] == "model" and isinstance(target, str) and target.startswith(OWN))
    return False


def _unknown(cfg: DictConfig, key: str, rules: dict) -> None:
    """A key that nothing reads (``+optimizer.momentun=0.9``): refused rather than silently ignored."""
    parent = key.rpartition(".")[0]
    siblings = _parent(cfg, key).keys()
    known = sorted(k for k in siblings if rule_for(f"{parent}.{k}" if parent else str(k), rules) is not None)
    raise ConfigError(f"{key} is unknown: {parent or 'the config'} takes {', '.join(map(str, known))}")


def check_values(cfg: DictConfig, rules: dict = RULES, pending: tuple = ()) -> dict:
    """Apply each key's rule, then the rules over several keys; returns the checked values. ``pending``: keys
    whose value is not there yet (the transfer study's pre-trained backbone), left out of both."""
    checked = {}  # every key's value, passed through or not: a rule over several keys may read any
    # Values set directly first: a bad value then names the key it was set at (seed), not one that refers
    # to it (datamodule.label_seed: ${seed}).
    for key in sorted(keys(cfg, rules), key=lambda k: OmegaConf.is_interpolation(_parent(cfg, k), _last(k))):
        if key in pending:
            continue
        rule = rule_for(key, rules)
        if isinstance(rule, Section):  # its keys are checked on their own: only its kind here, unresolved
            rule.check(key, OmegaConf.select(cfg, key))
            continue
        found = value(cfg, key)  # every reference must resolve, passed through or not
        if found is UNKNOWN:
            continue
        if rule is not None:
            rule.check(key, found)
        elif passed_through(key) is None and not _in_component(cfg, key):
            _unknown(cfg, key, rules)  # else passed through to a library, or an argument of a component
        checked[key] = found
    check_together(checked)
    return checked


def check_config(cfg: DictConfig, pending: tuple = ()) -> None:
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
    except Exception:  # a reference that cannot be resolved: check_values names it
        missing = []
    if missing:
        raise ConfigError(f"{missing[0]} is required but not set (e.g. {missing[0]}=<value> on the command line)")
    stage = value(cfg, "stage") if "stage" in cfg else None
    if stage is not None and stage is not UNKNOWN:  # first: it says which groups a run needs and what applies
        rule_for("stage").check("stage", stage)
    check_extras(cfg)
    for group in REQUIRED_GROUPS.get(stage, ()) if isinstance(stage, str) else ():
        node = cfg._get_node(group) if group in cfg else None
        if not isinstance(node, DictConfig) or node._is_none() or node._is_interpolation():
            options = ", ".join(sorted(p.stem for p in (CONF / group).glob("*.yaml")))
            raise ConfigError(
                f"{group}={show(None if node is None else node._value())}: a {stage} run needs a {group} config;"
                f" allowed is {group}=<one of: {options}>"
            )
    model = cfg._get_node("model") if "model" in cfg else None
    model = model if isinstance(model, DictConfig) and not model._is_none() else None
    # What the classes the config names take first, a tower's kind and init among it (check_modalities relies
    # on it): read from _target_ values, which are no interpolations, so a mismatch is named before a reference
    # it breaks (model.kwargs.in_chans=${datamodule.channels} on text data), and a tower of the wrong kind
    # (model@model.image=bert_micro), whose keys its place does not take, says why.
    towers_checked = model is None or _early(lambda: check_towers(model))
    modalities_checked = towers_checked and _early(lambda: check_modalities(cfg))
    check_values(cfg, pending=pending)
    if not towers_checked:
        check_towers(model)
    if not modalities_checked:
        check_modalities(cfg)
    towers = towers_of(cfg.model) if isinstance(cfg.get("model"), DictConfig) else {}
    for name in sorted(TOWER_KEYS):
        chosen = OmegaConf.select(cfg, f"freeze.{name}", default=None)
        if chosen is not None and name not in towers:
            raise ConfigError(
                f"freeze.{name}={chosen}: {choice_name(cfg, 'model')} has no {name} tower (freeze.{name} sets a dual"
                f" encoder's {name} tower); allowed is freeze.{name}=null, or freeze.layers for this backbone"
            )


def _targets(node) -> Iterator[str]:
    """Every ``_target_`` the config names, read without resolving anything."""
    if isinstance(node, DictConfig) and not node._is_none() and not node._is_interpolation():
        for name in node.keys():
            child = node._get_node(name)
            if name == "_target_" and isinstance(child._value(), str):
                yield child._value()
            else:
                yield from _targets(child)
    elif isinstance(node, ListConfig) and not node._is_none() and not node._is_interpolation():
        for index in range(len(node)):
            yield from _targets(node._get_node(index))


def check_extras(cfg: DictConfig) -> None:
    """What the config asks for that an optional extra installs (``core/extras.py``), refused in one line naming
    the ``pip install "pretune[<extra>]"`` before anything heavy is imported."""
    targets = set(_targets(cfg))
    model = cfg._get_node("model") if "model" in cfg else None
    model = model if isinstance(model, DictConfig) and not model._is_none() else None
    init = str(model._get_node("init")._value()) if model is not None and "init" in model else ""
    if any("Wandb" in t for t in targets) or init.startswith("wandb:"):
        require("logger=wandb" if not init.startswith("wandb:") else f"model.init={init}", "wandb")
    if any(t.startswith("datamodules.sources.shards") for t in targets):
        require("datamodule=shards", "litdata")
    lightly_objectives = tuple(f"lightning_modules.objectives.{name}." for name in ("byol", "dino", "vicreg"))
    if any(t.startswith(lightly_objectives) for t in targets):
        require(f"objective={choice_name(cfg, 'objective')}", "lightly")
    if any(t == "lightning_modules.callbacks.freezing.Adapters" for t in targets):
        require("freeze=lora", "peft")
    try:
        modality = model_modality(model) if model is not None else None
    except Exception:  # a reference that cannot be resolved: the rules name it
        modality = None
    if modality in ("text", "image_text") or any(t.startswith("lightning_modules.backbones.text") for t in targets):
        require(f"model={choice_name(cfg, 'model')} (a text backbone)", "transformers", "tokenizers")


def _early(check: Callable[[], None]) -> bool:
    """Run a check before the per-key rules: True when it passed; False when it met a value only the rules can
    name (a reference that cannot be resolved), to be run again after them."""
    try:
        check()
    except ConfigError:
        raise
    except Exception:  # omegaconf's InterpolationResolutionError and kin: check_values names it
        return False
    return True
