"""On a CUDA GPU only (skipped elsewhere): data placed on the device or copied from pinned memory give the same
batches; a training step never waits for the GPU; the run records what it resolved for the GPU.

These need the GPU machine; everything they rely on is also exercised on the CPU by the other tests.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = ["trainer=gpu", "trainer.accelerator=gpu", "trainer.devices=1"]


def test_device_and_pinned_placements_give_the_same_batches_as_each_other_and_close_to_the_cpu():
    from datamodules.sources.digits import DigitsDataModule

    device = torch.device("cuda", 0)
    resident, pinned, cpu = (DigitsDataModule(device_budget=b) for b in (0.25, 0.0, 0.25))
    for dm in (resident, pinned, cpu):
        dm.setup()
    assert resident.place(device) == "device" and resident.splits["train"]["image"].is_cuda
    assert pinned.place(device) == "pinned" and not pinned.splits["train"]["image"].is_cuda
    for a, b, c in zip(
        resident.eval_loader("val", 100), pinned.eval_loader("val", 100), cpu.eval_loader("val", 100), strict=True
    ):
        assert a["image"].is_cuda and b["image"].is_cuda and torch.equal(a["image"], b["image"])
        torch.testing.assert_close(a["image"].cpu(), c["image"], rtol=1e-5, atol=1e-5)  # GPU vs CPU kernels
        assert torch.equal(a["label"].cpu(), c["label"])


class SyncsInSteadySteps:
    """A callback: every host sync in training steps after the first of each epoch is a warning (sync debug mode)
    recorded here; the steps include the logging cadence (log_every_n_steps=2), so reports are read in them."""

    def __new__(cls, found: list):
        from pytorch_lightning.callbacks import Callback

        class _Syncs(Callback):
            catcher = None

            def _stop(self):
                if self.catcher is not None:
                    torch.cuda.set_sync_debug_mode(0)
                    found.extend(
                        f"{w.filename}:{w.lineno} {w.message}" for w in self.caught if "synchroniz" in str(w.message)
                    )
                    self.catcher.__exit__(None, None, None)
                    self.catcher = None

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if batch_idx >= 1 and self.catcher is None:
                    self.catcher = warnings.catch_warnings(record=True)
                    self.caught = self.catcher.__enter__()
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")

            def on_validation_start(self, trainer, pl_module):
                self._stop()

            def on_train_epoch_end(self, trainer, pl_module):
                self._stop()

        return _Syncs()


FOUND: list = []  # syncs found by the callback below


def syncs_callback():
    return SyncsInSteadySteps(FOUND)


@pytest.mark.parametrize(
    ("stage", "overrides"),
    [
        ("finetune", ["model=resnet_micro"]),  # channels-last, BatchNorm
        ("finetune", ["model=vit_micro", "freeze.layers=2", "objective.mixup=0.2"]),
        ("pretrain", ["objective=mae", "model=vit_micro"]),
        ("pretrain", ["objective=simclr", "model=resnet_micro", "datamodule.device_budget=0"]),  # pinned copies
    ],
    ids=["resnet", "vit-frozen-mixup", "mae", "simclr-pinned"],
)
def test_training_steps_never_wait_for_the_gpu(cfg_factory, stage, overrides):
    from lightning_modules.runtime.run import run

    FOUND.clear()
    cfg = cfg_factory(
        stage,
        *GPU,
        *overrides,
        "trainer.max_epochs=2",
        "datamodule.train_batches_per_epoch=8",
        "trainer.log_every_n_steps=2",
        "trainer.enable_progress_bar=true",
        "logger=csv",
        "+callbacks.syncs._target_=tests.test_gpu.syncs_callback",
    )
    metrics = run(cfg)
    assert metrics["status"] == "ok"
    assert FOUND == [], "\n".join(FOUND)


def test_a_gpu_run_records_tf32_placement_fused_optimizer_and_channels_last(cfg_factory, tmp_path):
    from lightning_modules.runtime.run import run

    metrics = run(cfg_factory("finetune", *GPU, "model=resnet_micro", "debug=fast", name="run"))
    assert json.loads((tmp_path / "run" / "run.json").read_text())["float32_matmul_precision"] == "high"
    assert metrics["data/placement"] == "device"
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["data/placement"] == "device"


def test_fused_optimizer_and_channels_last_on_cuda():
    from lightning_modules.training.module import use_channels_last
    from lightning_modules.training.optim import build_optimizer
    from tests.helpers import resnet

    backbone = resnet().cuda()
    optimizer = build_optimizer({"name": "adamw", "lr": 1e-3}, backbone, torch.nn.Identity())
    assert optimizer.defaults["fused"] is True
    assert use_channels_last("auto", backbone.model, torch.device("cuda", 0))
