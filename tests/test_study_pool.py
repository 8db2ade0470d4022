"""The transfer study's pool (``workers: N``): its fine-tuning jobs side by side in worker processes give each job
the metrics it gets when the jobs run one after another, in the jobs' order, whichever worker finished first."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.core.cores import threads_per_job
from pretune.commands.transfer_study import _run_composed, stage_pool
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
    torch.set_num_threads(threads_per_job(2))  # as each of the pool's 2 workers
    order: list = []
    try:
        serial = _run(stage_pool(1), configs["serial"], order)
    finally:
        torch.set_num_threads(threads)
    assert order == [0, 1, 2]  # in process: each run when submitted
    finished: list = []
    pooled = _run(stage_pool(2), configs["pool"], finished)
    assert sorted(finished) == [0, 1, 2]
    for one, other in zip(serial, pooled, strict=True):
        assert other["threads"] == one["threads"]
        for key in ("train/loss", "val/loss", "test/loss", "test/acc", "steps"):
            assert other[key] == one[key], key
    assert len({m["train/loss"] for m in serial}) == 3


def _run(pool, configs, finished: list) -> list[dict]:
    with pool:
        futures = [pool.submit(_run_composed, cfg) for cfg in configs]
        for i, future in enumerate(futures):
            future.add_done_callback(lambda _, i=i: finished.append(i))
    return [future.result() for future in futures]
