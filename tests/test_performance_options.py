"""The performance-related options: model.compile is checked before training, and the run adds one cheap
progress bar (redrawn at most 10 times a second) only where the trainer shows one."""

from __future__ import annotations

import pytest
from omegaconf import open_dict

from lightning_modules.config.check import check_config
from lightning_modules.config.errors import ConfigError
from lightning_modules.runtime.run import _progress_bar
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
    assert isinstance(bar, ProgressBar)
    assert _progress_bar(cfg, [TQDMProgressBar()]) == []  # a configured bar is left alone


def test_progress_bar_redraws_at_most_ten_times_a_second_and_always_at_the_end(monkeypatch):
    import lightning_modules.callbacks.progress as progress

    clock = iter([0.0, 0.03, 0.06, 0.12, 0.15, 0.16, 0.17])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    bar = progress.ThrottledProgressBar()
    drawn = [bar._should_update(n, 7) for n in range(1, 8)]
    # drawn at t=0, then not before t=0.1 (0.12), then at the bar's end (batch 7 of 7) whatever the time
    assert drawn == [True, False, False, True, False, False, True]
    bar.disable()
    assert not bar._should_update(7, 7)


@pytest.mark.parametrize("before", [None, "1"])
def test_runtime_cuda_check_is_scoped_to_its_block(monkeypatch, before):
    import os

    from lightning_modules.runtime.cuda_check import VARIABLE, runtime_cuda_check

    if before is None:
        monkeypatch.delenv(VARIABLE, raising=False)
    else:
        monkeypatch.setenv(VARIABLE, before)
    with runtime_cuda_check():
        assert os.environ[VARIABLE] == "0"
    assert os.environ.get(VARIABLE) == before
    with pytest.raises(RuntimeError), runtime_cuda_check():
        raise RuntimeError("a failed fit restores it too")
    assert os.environ.get(VARIABLE) == before
    with runtime_cuda_check(enabled=False):  # a GPU run keeps Lightning's setting
        assert os.environ.get(VARIABLE) == before
