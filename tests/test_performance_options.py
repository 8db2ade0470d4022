"""The performance-related options: model.compile is checked before training, and the run adds one cheap
progress bar only where the trainer shows one."""

from __future__ import annotations

import pytest
from omegaconf import open_dict

from datamodules.errors import ConfigError
from lightning_modules.config_check import check_config
from lightning_modules.run import _progress_bar
from tests.conftest import make_cfg


def test_model_compile_must_be_a_boolean(tmp_path):
    check_config(make_cfg("finetune", ["model.compile=true"], tmp_path))
    with pytest.raises(ConfigError, match=r"model.compile='yes' is invalid: allowed are true, false"):
        check_config(make_cfg("finetune", ["model.compile=yes"], tmp_path))


def test_progress_bar_is_added_once_and_only_when_enabled():
    from pytorch_lightning.callbacks import ProgressBar, TQDMProgressBar

    cfg = make_cfg("finetune", [])
    assert _progress_bar(cfg, []) == []  # the tests' config turns the bar off
    with open_dict(cfg):
        cfg.trainer.enable_progress_bar = True
    (bar,) = _progress_bar(cfg, [])
    assert isinstance(bar, ProgressBar) and bar.refresh_rate == 10
    assert _progress_bar(cfg, [TQDMProgressBar()]) == []  # a configured bar is left alone
