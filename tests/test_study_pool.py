"""The transfer study's pool (``workers: N``): its fine-tuning jobs side by side in worker processes give each job
the metrics it gets when the jobs run one after another, in the jobs' order, whichever worker finished first."""

from __future__ import annotations

import os

import pytest
import torch

from pretune.commands.transfer_study import _finetune_all
from tests.conftest import make_cfg

JOB = ["debug=limit", "model=resnet_micro", "datamodule.train_batches_per_epoch=3", "trainer.max_epochs=2"]


@pytest.mark.slow
def test_jobs_in_two_worker_processes_equal_the_same_jobs_one_after_another(tmp_path):
    lrs = ("1e-3", "3e-2", "1e-2")  # the second job diverges from the others: a mixed-up order would show
    configs = {
        where: [make_cfg("finetune", [*JOB, f"optimizer.lr={lr}"], tmp_path / where / lr) for lr in lrs]
        for where in ("serial", "pool")
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))  # as each of the pool's 2 workers: the same arithmetic
    try:
        order = []
        serial = _finetune_all(configs["serial"], workers=1, done=lambda i, m: order.append(i))
    finally:
        torch.set_num_threads(threads)
    assert order == [0, 1, 2]
    finished = []
    pooled = _finetune_all(configs["pool"], workers=2, done=lambda i, m: finished.append(i))
    assert sorted(finished) == [0, 1, 2]
    for one, other in zip(serial, pooled, strict=True):
        assert other["threads"] == one["threads"]
        for key in ("train/loss", "val/loss", "test/loss", "test/acc", "steps"):
            assert other[key] == one[key], key
    assert len({m["train/loss"] for m in serial}) == 3
