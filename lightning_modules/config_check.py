"""Checks on the composed config that need no heavy import: a bad value fails here, at once,
with one line naming the key, the value and what is allowed."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from datamodules.errors import ConfigError


def _get(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)


def _number(cfg, key, *, low=None, high=None, low_open=False, high_open=False, integer=False, optional=False):
    value = _get(cfg, key)
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ConfigError(f"{key}={value!r} is invalid: allowed is {kind}{_range_text(low, high, low_open, high_open)}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ConfigError(
            f"{key}={value} is out of range: allowed is {kind}{_range_text(low, high, low_open, high_open)}"
        )


def _range_text(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


def check_config(cfg: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]} is required but not set (e.g. {missing[0]}=<value> on the command line)")
    stage = _get(cfg, "stage")
    if stage not in ("pretrain", "finetune"):
        raise ConfigError(f"stage={stage!r} is invalid: allowed are 'pretrain', 'finetune'")
    _number(cfg, "seed", integer=True)
    _number(cfg, "optimizer.lr", low=0, low_open=True)
    _number(cfg, "optimizer.weight_decay", low=0, optional=True)
    _number(cfg, "optimizer.backbone_lr_scale", low=0, optional=True)
    _number(cfg, "optimizer.layer_decay", low=0, high=1, low_open=True, optional=True)
    _number(cfg, "datamodule.batch_size", low=1, integer=True)
    _number(cfg, "datamodule.image_size", low=4, integer=True)
    _number(cfg, "datamodule.label_fraction", low=0, high=1, low_open=True)
    _number(cfg, "trainer.max_epochs", low=1, integer=True, optional=True)
    _number(cfg, "objective.mask_ratio", low=0, high=1, low_open=True, high_open=True, optional=True)
    _number(cfg, "objective.temperature", low=0, low_open=True, optional=True)
    _number(cfg, "scheduler.warmup_fraction", low=0, high=1, high_open=True, optional=True)
    if stage == "finetune":
        layers = _get(cfg, "freeze.layers")
        if (
            layers is not None
            and layers != "all"
            and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 0)
        ):
            raise ConfigError(f"freeze.layers={layers!r} is invalid: allowed is an integer >= 0 or 'all'")
        for key in ("freeze.start", "freeze.probe_epochs"):
            _number(cfg, key, low=0, integer=True, optional=True)
        _number(cfg, "freeze.every", low=1, integer=True, optional=True)
        _number(cfg, "finetune.l2_sp", low=0, optional=True)
        _number(cfg, "freeze.ft_lr_scale", low=0, high=1, low_open=True, optional=True)
    if not isinstance(_get(cfg, "model.compile") or False, bool):
        raise ConfigError(f"model.compile={_get(cfg, 'model.compile')!r} is invalid: allowed are true, false")
    init = str(_get(cfg, "model.init"))
    if init not in ("none", "timm"):
        from lightning_modules.handoff import find_backbone_dir

        find_backbone_dir(init)  # raises a ConfigError naming model.init when there is nothing there
