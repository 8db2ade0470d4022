"""Checks on the composed config that need no heavy import: a bad value fails here, at once,
with one line naming the key, the value and what is allowed."""

from __future__ import annotations

from collections.abc import Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_modules.config.errors import ConfigError
from lightning_modules.config.modalities import check_modalities
from lightning_modules.config.schema import RULES, check_together, rule_for


def keys(cfg: DictConfig, rules: dict = RULES, prefix: str = "") -> Iterator[str]:
    """Every key of ``cfg`` that is a leaf or has a rule of its own (a rule covers everything below it),
    in the config's order. A list is a leaf."""
    for name in cfg.keys():
        key = f"{prefix}{name}"
        child = cfg._get_node(name)
        if rule_for(key, rules) is None and isinstance(child, DictConfig) and not child._is_none():
            if child._is_interpolation():
                yield key
            else:
                yield from keys(child, rules, f"{key}.")
        else:
            yield key


def value(cfg: DictConfig, key: str):
    """The resolved value at ``key`` (containers as plain dicts and lists); a reference that cannot be
    resolved is the user's mistake too (``optimizer.lr=${nope}``)."""
    try:
        found = OmegaConf.select(cfg, key, throw_on_missing=True)
        if isinstance(found, (DictConfig, ListConfig)):
            found = OmegaConf.to_container(found, resolve=True)
    except Exception as err:  # omegaconf's InterpolationResolutionError and kin
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


def _resolvable_here(cfg: DictConfig, key: str) -> bool:
    """False for a value that only the Hydra app knows (``${hydra:runtime.output_dir}`` composed in a test)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() or "${hydra:" not in str(_raw(cfg, key))


def check_values(cfg: DictConfig, rules: dict = RULES) -> dict:
    """Apply each key's rule, then the rules over several keys; returns the checked values."""
    checked = {}
    # Values set directly first: a bad value then names the key it was set at (seed), not one that refers
    # to it (datamodule.label_seed: ${seed}).
    for key in sorted(keys(cfg, rules), key=lambda k: OmegaConf.is_interpolation(_parent(cfg, k), _last(k))):
        if not _resolvable_here(cfg, key):
            continue
        found = value(cfg, key)  # every reference must resolve, passed through or not
        rule = rule_for(key, rules)
        if rule is not None:  # else passed through to a library (schema.PASSED_THROUGH), or a key of the user's own
            checked[key] = rule.check(key, found)
    check_together(checked)
    return checked


def check_config(cfg: DictConfig) -> None:
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
    except Exception:  # a reference that cannot be resolved: check_values names it
        missing = []
    if missing:
        raise ConfigError(f"{missing[0]} is required but not set (e.g. {missing[0]}=<value> on the command line)")
    check_values(cfg)
    check_modalities(cfg)
