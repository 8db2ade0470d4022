"""Checks on the composed config that need no heavy import: a bad value fails here, at once,
with one line naming the key, the value and what is allowed."""

from __future__ import annotations

from contextlib import nullcontext

from omegaconf import DictConfig, OmegaConf

from lightning_modules.config.errors import ConfigError
from lightning_modules.config.modalities import TOWERS, _choice, check_modalities, tower_errors, towers_of
from lightning_modules.config.schema import RULES

_ABSENT = object()


def _get(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)


def check_config(cfg: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]} is required but not set (e.g. {missing[0]}=<value> on the command line)")
    stage = _get(cfg, "stage")
    if stage not in ("pretrain", "finetune", "evaluate"):
        raise ConfigError(f"stage={stage!r} is invalid: allowed are 'pretrain', 'finetune', 'evaluate'")
    for key, rule in RULES.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
        if value is not _ABSENT:  # e.g. freeze.* when pre-training
            rule.check(key, value)
    check_modalities(cfg)
    if not isinstance(_get(cfg, "model.compile") or False, bool):
        raise ConfigError(f"model.compile={_get(cfg, 'model.compile')!r} is invalid: allowed are true, false")
    _check_preprocessing(cfg)
    from lightning_modules.backbones.weight_files import check_init_map

    check_init_map(_get(cfg, "model.init_map"))
    _check_init("model", str(_get(cfg, "model.init")))
    towers = towers_of(cfg.model)
    for name, tower in towers.items():
        _check_init(f"model.{name}", str(tower.get("init", "none")))
    for name in sorted({n for names in TOWERS.values() for n in names}):
        value = _get(cfg, f"freeze.{name}")
        if value is not None and name not in towers:
            raise ConfigError(
                f"freeze.{name}={value}: {_choice(cfg, 'model')} has no {name} tower (freeze.{name} sets a dual"
                f" encoder's {name} tower); allowed is freeze.{name}=null, or freeze.layers for this backbone"
            )


def _check_preprocessing(cfg: DictConfig) -> None:
    """``model.mean`` / ``model.std``: null, or a list of numbers (std > 0), one per input channel or RGB."""
    for key in ("model.mean", "model.std"):
        value = _get(cfg, key)
        if value is None:
            continue
        numbers = list(value) if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else None
        if (
            not numbers
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in numbers)
            or (key == "model.std" and any(v <= 0 for v in numbers))
        ):
            allowed = "a list of numbers > 0" if key == "model.std" else "a list of numbers"
            raise ConfigError(f"{key}={value!r} is invalid: allowed is null or {allowed}, one per channel")


def _check_init(key: str, init: str) -> None:
    """``<key>.init``'s form, and that what it names is there (a tower's init is checked as the model's is)."""
    from lightning_modules.backbones.weight_files import is_file_init, weight_file_path

    tower = key.split(".", 1)[1] if "." in key else None
    with tower_errors(tower, {"init": init}) if tower else nullcontext():
        if is_file_init(init):
            weight_file_path(init)  # the form, and that the file is there
        elif init.startswith("wandb:"):  # fetched when the run starts; only its form can be checked here
            if init.count("/") != 2 or ":" not in init.removeprefix("wandb:"):
                raise ConfigError(f"model.init={init} is invalid: allowed is wandb:<entity>/<project>/<name>:<alias>")
        elif init.startswith("hf:"):  # a local model dir, or a hub name (not when offline, unless cached)
            from lightning_modules.config.modalities import hf_local_dir

            hf_local_dir(init.removeprefix("hf:"))
        elif init not in ("none", "timm"):
            from lightning_modules.backbones.handoff import find_backbone_dir

            find_backbone_dir(init)  # raises a ConfigError naming model.init when there is nothing there
