"""Checks on the composed config that need no heavy import: a bad value fails here, at once,
with one line naming the key, the value and what is allowed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_modules.config.kinds import Section
from lightning_modules.config.modalities import TOWERS, _choice, check_modalities, check_towers, towers_of
from lightning_modules.config.rules import REQUIRED_GROUPS, RULES, check_together, passed_through, rule_for
from lightning_modules.core.errors import ConfigError, show


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


CONF = Path(__file__).resolve().parents[2] / "conf"
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
    """Whether ``key`` is inside a node built from its ``_target_`` (which refuses an argument it does not take)."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        node = OmegaConf.select(cfg, ".".join(parts[:i]), default=None)
        if isinstance(node, DictConfig) and "_target_" in node:
            return True
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
    for group in REQUIRED_GROUPS.get(stage, ()) if isinstance(stage, str) else ():
        node = cfg._get_node(group) if group in cfg else None
        if not isinstance(node, DictConfig) or node._is_none() or node._is_interpolation():
            options = ", ".join(sorted(p.stem for p in (CONF / group).glob("*.yaml")))
            raise ConfigError(
                f"{group}={show(None if node is None else node._value())}: a {stage} run needs a {group} config;"
                f" allowed is {group}=<one of: {options}>"
            )
    model = cfg._get_node("model") if "model" in cfg else None
    towers_checked = not isinstance(model, DictConfig) or model._is_none()
    if not towers_checked:
        # A tower's kind and init first (here only: check_modalities relies on it): a tower of the wrong kind
        # (model@model.image=bert_micro) has keys its place does not take, and the line should say why.
        try:
            check_towers(model)
            towers_checked = True
        except ConfigError:
            raise
        except Exception:  # a reference that cannot be resolved (model.type=${nope}): check_values names it
            pass
    check_values(cfg, pending=pending)
    if not towers_checked:
        check_towers(model)
    check_modalities(cfg)
    towers = towers_of(cfg.model) if isinstance(cfg.get("model"), DictConfig) else {}
    for name in sorted({n for names in TOWERS.values() for n in names}):
        chosen = OmegaConf.select(cfg, f"freeze.{name}", default=None)
        if chosen is not None and name not in towers:
            raise ConfigError(
                f"freeze.{name}={chosen}: {_choice(cfg, 'model')} has no {name} tower (freeze.{name} sets a dual"
                f" encoder's {name} tower); allowed is freeze.{name}=null, or freeze.layers for this backbone"
            )
