"""The performance-related options: model.compile is checked before training, and the run adds one cheap
progress bar (redrawn at most 10 times a second) only where the trainer shows one."""

from __future__ import annotations

import pytest
import torch
import yaml

from lightning_modules.config.check import check_config
from lightning_modules.core.errors import ConfigError
from lightning_modules.runtime.run import _progress_bar
from tests.conftest import make_cfg


def test_model_compile_must_be_a_boolean(tmp_path):
    check_config(make_cfg("finetune", ["model.compile=true"], tmp_path))
    with pytest.raises(ConfigError, match=r"model.compile='yes' is invalid: allowed are true, false"):
        check_config(make_cfg("finetune", ["model.compile=yes"], tmp_path))


def test_progress_bar_is_added_once_and_only_when_enabled():
    from pytorch_lightning.callbacks import ProgressBar, TQDMProgressBar

    assert _progress_bar(False, []) == []  # trainer.enable_progress_bar=false (the tests' config)
    (bar,) = _progress_bar(True, [])
    assert isinstance(bar, ProgressBar)
    assert _progress_bar(True, [TQDMProgressBar()]) == []  # a configured bar is left alone


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


# --- options for GPUs, each 'auto' leaving the CPU as it was ------------------------------------------------


def test_optimizer_implementation_is_fused_on_cuda_and_torchs_default_elsewhere():
    from types import SimpleNamespace

    from lightning_modules.training.optim import implementation

    on_cuda, on_cpu = [SimpleNamespace(is_cuda=True)] * 2, [torch.zeros(1)]
    assert implementation("auto", on_cuda) == {"fused": True}
    assert implementation("auto", on_cpu) == {}  # the CPU keeps torch's default (its for-loop)
    assert implementation("foreach", on_cpu) == {"foreach": True}
    with pytest.raises(ConfigError, match=r"optimizer.implementation='fast' is invalid: allowed are 'auto', 'fused'"):
        implementation("fast", on_cpu)


def test_channels_last_is_on_for_cnns_on_cuda_only():
    from lightning_modules.training.module import use_channels_last
    from tests.helpers import resnet, vit

    cnn, transformer = resnet().model, vit().model
    assert use_channels_last("auto", cnn, torch.device("cuda", 0))
    assert not use_channels_last("auto", transformer, torch.device("cuda", 0))  # one conv: the patch embedding
    assert not use_channels_last("auto", cnn, torch.device("cpu"))
    assert use_channels_last(True, transformer, torch.device("cpu"))
    with pytest.raises(ConfigError, match="model.channels_last='nhwc' is invalid"):
        use_channels_last("nhwc", cnn, torch.device("cpu"))


def test_channels_last_changes_no_result_beyond_float_tolerance():
    from lightning_modules.objectives.classification import Classification
    from lightning_modules.training.module import PretuneModule
    from tests.helpers import SPEC, batch, resnet

    results = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        backbone = resnet()
        module = PretuneModule(backbone, Classification(backbone, SPEC), {"lr": 1e-3}, {"name": "none"})
        module.channels_last = channels_last
        if channels_last:
            module.backbone.to(memory_format=torch.channels_last)
        loss = module(batch(16))["loss"]
        loss.backward()
        grads = {n: p.grad.contiguous() for n, p in module.named_parameters()}
        conv = module.backbone.model.layer1[0].conv1.weight  # (the stem has one input channel: both layouts)
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-5)


def test_a_channels_last_run_on_cpu_trains_as_the_default_one(cfg_factory):
    from lightning_modules.runtime.run import run

    common = ["model=resnet_micro", "trainer.max_epochs=2", "trainer.limit_train_batches=3", "datamodule.batch_size=32"]
    default = run(cfg_factory("finetune", *common, name="default"))
    nhwc = run(cfg_factory("finetune", *common, "model.channels_last=true", name="nhwc"))
    assert nhwc["val/loss"] == pytest.approx(default["val/loss"], rel=1e-4)
    assert nhwc["train/loss"] == pytest.approx(default["train/loss"], rel=1e-4)


def test_float32_matmul_precision_is_resolved_and_recorded(cfg_factory, tmp_path):
    from lightning_modules.core.results import read_run_record
    from lightning_modules.runtime.run import matmul_precision, run

    assert matmul_precision("auto", "cpu") == "highest"  # auto on the CPU: torch's default, unchanged
    assert matmul_precision("auto", "gpu") == "high"  # auto on a GPU: TF32
    assert matmul_precision("highest", "gpu") == "highest"
    with pytest.raises(ConfigError, match=r"float32_matmul_precision='tf32' is invalid: allowed are 'auto'"):
        check_config(make_cfg("finetune", ["float32_matmul_precision=tf32"], tmp_path))
    run(cfg_factory("finetune", "model=resnet_micro", "debug=fast", name="run"))
    assert read_run_record(tmp_path / "run")["float32_matmul_precision"] == "highest"
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["float32_matmul_precision"] == "auto"


def test_host_reports_are_read_at_once_on_the_cpu():
    from lightning_modules.training.module import HostReports

    reports = HostReports()
    value = torch.tensor([1.5, float("nan")])
    reports.send(value, "step 9")
    value.zero_()  # the report holds the value at the time it was sent
    ((tag, values),) = reports.ready()
    assert tag == "step 9" and values[0] == 1.5 and values[1] != values[1]
    assert reports.ready() == []


def test_last_checkpoint_cadence_is_one_of_epochs_steps_or_minutes(tmp_path):
    from lightning_modules.callbacks.checkpoint import LastCheckpoint

    assert LastCheckpoint(dirpath=tmp_path).every_n_epochs == 1
    steps = LastCheckpoint(dirpath=tmp_path, every_n_train_steps=500)
    assert steps.every_n_epochs == 0 and steps._every_n_train_steps == 500  # the steps replace the epoch cadence
    minutes = LastCheckpoint(dirpath=tmp_path, every_minutes=30)
    assert minutes.every_n_epochs == 0 and minutes._train_time_interval.total_seconds() == 1800
    with pytest.raises(ConfigError, match=r"every_n_train_steps=5 and callbacks.last_checkpoint.every_minutes=1"):
        LastCheckpoint(dirpath=tmp_path, every_n_train_steps=5, every_minutes=1)
    with pytest.raises(ConfigError, match=r"callbacks.last_checkpoint.every_n_train_steps=0 is out of range"):
        check_config(make_cfg("finetune", ["callbacks.last_checkpoint.every_n_train_steps=0"], tmp_path))
