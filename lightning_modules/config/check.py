"""Checks on the composed config that need no heavy import: a bad value fails here, at once,
with one line naming the key, the value and what is allowed."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from lightning_modules.config.errors import ConfigError
from lightning_modules.config.modalities import check_modalities
from lightning_modules.config.schema import RULES

_ABSENT = object()


def _get(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)


def check_config(cfg: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]} is required but not set (e.g. {missing[0]}=<value> on the command line)")
    stage = _get(cfg, "stage")
    if stage not in ("pretrain", "finetune"):
        raise ConfigError(f"stage={stage!r} is invalid: allowed are 'pretrain', 'finetune'")
    for key, rule in RULES.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
        if value is not _ABSENT:  # e.g. freeze.* when pre-training
            rule.check(key, value)
    check_modalities(cfg)
    # (model.channels_last also takes 'auto': its rule in RULES checks it)
    if not isinstance(_get(cfg, "model.compile") or False, bool):
        raise ConfigError(f"model.compile={_get(cfg, 'model.compile')!r} is invalid: allowed are true, false")
    init = str(_get(cfg, "model.init"))
    _check_preprocessing(cfg)
    from lightning_modules.backbones.weight_files import check_init_map, is_file_init, weight_file_path

    check_init_map(_get(cfg, "model.init_map"))
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
