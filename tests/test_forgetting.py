"""Forgetting: the pre-training loss on held-out images, before and after fine-tuning."""

from __future__ import annotations

import pytest

from lightning_modules.core.errors import ConfigError
from lightning_modules.runtime.run import run

TINY = [
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "model=resnet_micro",
    "datamodule.batch_size=32",
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from tests.conftest import make_cfg

    out = tmp_path_factory.mktemp("pre")
    run(make_cfg("pretrain", [*TINY, "objective=simclr", "objective.proj_hidden=32"], out))
    return out


def test_frozen_backbone_forgets_nothing_full_finetune_does(cfg_factory, pretrained):
    common = [*TINY, f"model.init={pretrained}", "finetune.measure_forgetting=true", "optimizer.lr=0.01"]
    probe = run(cfg_factory("finetune", *common, "freeze=linear_probe", name="lp"))
    full = run(cfg_factory("finetune", *common, "freeze=none", name="full"))
    assert probe["forgetting/pretrain_loss_before"] == full["forgetting/pretrain_loss_before"] > 0
    assert probe["forgetting/increase"] == 0.0  # bit-for-bit frozen backbone, fixed views: nothing moved
    assert full["forgetting/increase"] != 0.0


def test_forgetting_needs_a_pretraining_run(cfg_factory):
    with pytest.raises(ConfigError, match="finetune.measure_forgetting=true needs model.init"):
        run(cfg_factory("finetune", *TINY, "finetune.measure_forgetting=true"))
