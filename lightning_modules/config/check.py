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
    if not isinstance(_get(cfg, "model.compile") or False, bool):
        raise ConfigError(f"model.compile={_get(cfg, 'model.compile')!r} is invalid: allowed are true, false")
    init = str(_get(cfg, "model.init"))
    if init.startswith("wandb:"):  # fetched when the run starts; only its form can be checked here
        if init.count("/") != 2 or ":" not in init.removeprefix("wandb:"):
            raise ConfigError(f"model.init={init} is invalid: allowed is wandb:<entity>/<project>/<name>:<alias>")
    elif init.startswith("hf:"):  # a local model dir, or a hub name (not when offline, unless cached)
        from lightning_modules.config.modalities import hf_local_dir

        hf_local_dir(init.removeprefix("hf:"))
    elif init not in ("none", "timm"):
        from lightning_modules.backbones.handoff import find_backbone_dir

        find_backbone_dir(init)  # raises a ConfigError naming model.init when there is nothing there
    tokenizer = _get(cfg, "model.tokenizer")
    if tokenizer:  # a text backbone from scratch on another backbone's tokenizer
        if init != "none":
            raise ConfigError(
                f"model.tokenizer={tokenizer} is for a backbone built from scratch (model.init=none);"
                f" model.init={init} brings its own tokenizer"
            )
        from lightning_modules.backbones.tokenizer import tokenizer_dir

        tokenizer_dir(str(tokenizer))  # raises a ConfigError naming model.tokenizer when there is nothing there
