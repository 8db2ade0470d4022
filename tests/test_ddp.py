"""Scaling out: DDP on 2 CPU processes (gloo) matches one process on the same global batch; a multirun of
DDP jobs writes one complete run dir per job; the multi-node and FSDP configs compose and instantiate (two nodes
on loopback: tests/test_nodes.py; FSDP training: tests/test_fsdp.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import initialize_config_dir
from hydra.utils import instantiate

from tests.conftest import CONF, ROOT, make_cfg

TINY = ["debug=limit", "trainer.enable_progress_bar=false", "model=vit_micro"]


# --- units: the gathered loss, the sharded loader, the child command ------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nt_xent_rank(rank: int, world: int, port: int, z1, z2, out: str) -> None:
    """One rank of a gloo group: NT-Xent on this rank's slice, negatives gathered from all ranks."""
    import torch.distributed as dist

    from lightning_modules.objectives.simclr import nt_xent

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for split in ((4, 4), (5, 3)):  # an even split (training), an uneven one (a last eval batch)
        lo = sum(split[:rank])
        a = z1[lo : lo + split[rank]].clone().requires_grad_(True)
        b = z2[lo : lo + split[rank]].clone().requires_grad_(True)
        loss = nt_xent(a, b, 0.2)
        loss.backward()
        torch.save({"loss": loss.detach(), "g1": a.grad, "g2": b.grad}, f"{out}/{split}_{rank}.pt")
    # Both ranks have written their results once they pass the barrier. Then they leave without tearing
    # gloo down: its destructors race with the peer's (a rank aborted with "terminate called without an
    # active exception", SIGABRT, in about one full-suite run in three, even after a barrier).
    dist.barrier()
    os._exit(0)


def test_gathered_nt_xent_equals_the_global_batch_loss_and_gradients(tmp_path):
    gen = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 5, generator=gen), torch.randn(8, 5, generator=gen)
    torch.save({"z1": z1, "z2": z2}, tmp_path / "z.pt")
    # The ranks start from a fresh interpreter, not from this one: what earlier tests left in this
    # process (threads, LOCAL_RANK/MASTER_* variables) once made a spawned rank abort.
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")}
    spawn = (
        "import sys, torch; from tests.test_ddp import _free_port, _nt_xent_rank; z = torch.load(sys.argv[1]);"
        " torch.multiprocessing.spawn(_nt_xent_rank, args=(2, _free_port(), z['z1'], z['z2'], sys.argv[2]), nprocs=2)"
    )
    result = subprocess.run(
        [sys.executable, "-c", spawn, str(tmp_path / "z.pt"), str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    from lightning_modules.objectives.simclr import nt_xent

    a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    loss = nt_xent(a, b, 0.2)
    loss.backward()
    ranks = [torch.load(tmp_path / f"(4, 4)_{r}.pt") for r in range(2)]
    # The mean of the ranks' losses is the global loss; DDP averages gradients over ranks, so each rank's
    # gradient (which includes the other ranks' losses, through the gather) / 2 is the global gradient.
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(torch.cat([r["g1"] for r in ranks]) / 2, a.grad)
    torch.testing.assert_close(torch.cat([r["g2"] for r in ranks]) / 2, b.grad)
    # 5 + 3 images: the loss weighted by each rank's share (as the epoch's val/loss is) is the global loss.
    uneven = [torch.load(tmp_path / f"(5, 3)_{r}.pt") for r in range(2)]
    assert (5 * uneven[0]["loss"] + 3 * uneven[1]["loss"]).item() / 8 == pytest.approx(loss.item(), rel=1e-6)


def test_each_rank_gets_its_slice_of_every_global_batch():
    from datamodules.loading.in_memory import BatchLoader

    data = {"i": torch.arange(50)}
    for shuffle, drop_last, size in ((True, True, 4), (False, False, 8)):
        single = [b["i"] for b in BatchLoader(data, size * 2, shuffle, drop_last, seed=3)]
        ranks = [[b["i"] for b in BatchLoader(data, size, shuffle, drop_last, seed=3, rank=r, world=2)] for r in (0, 1)]
        assert len(ranks[0]) == len(single)
        for step, batch in enumerate(single):  # step by step, the two ranks together hold the single batch
            assert torch.equal(torch.cat([ranks[0][step], ranks[1][step]]), batch)
    # 50 eval examples in global batches of 16: the last one (2 examples) is split 1 + 1. With 49, the last
    # example alone could not be split: it joins the batch before, so both ranks run 3 batches, none empty.
    assert [len(b["i"]) for b in BatchLoader(data, 8, False, False, rank=1, world=2)] == [8, 8, 8, 1]
    odd = {"i": torch.arange(49)}
    ranks = [list(BatchLoader(odd, 8, False, False, rank=r, world=2)) for r in (0, 1)]
    assert [[len(b["i"]) for b in r] for r in ranks] == [[8, 8, 9], [8, 8, 8]]
    assert torch.equal(torch.sort(torch.cat([b["i"] for r in ranks for b in r])).values, odd["i"])


def test_each_rank_draws_its_slice_of_the_global_batch_masks_and_augmentations(monkeypatch):
    import lightning_modules.core.distributed as distributed
    from datamodules.transforms.augment import BatchAugment
    from lightning_modules.objectives.mae import random_masking
    from tests.helpers import batch

    augment = BatchAugment((0.5, 1.0), 20, 0.1, True, brightness=0.2, contrast=0.2, noise=0.05, erase=0.5)
    x = batch(8)["image"]
    torch.manual_seed(0)  # EpochSeed gives every rank the same stream
    single = (random_masking(8, 16, 0.75)[1], augment(x))
    ranks = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank_world", lambda r=rank: (r, 2))
        torch.manual_seed(0)
        ranks.append((random_masking(4, 16, 0.75)[1], augment(x[rank * 4 : (rank + 1) * 4])))
    assert torch.equal(torch.cat([r[0] for r in ranks]), single[0])
    torch.testing.assert_close(torch.cat([r[1] for r in ranks]), single[1])


def test_a_child_rank_reruns_this_job_not_the_sweep(tmp_path, monkeypatch):
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from lightning_modules.runtime.parallel import hydra_job_command

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("finetune", overrides=["freeze.layers=all", "trainer=ddp"], return_hydra_config=True)
    with open_dict(cfg):  # what Hydra sets when it runs job 1 of a sweep
        cfg.hydra.runtime.output_dir = str(tmp_path / "sweep" / "1")
        cfg.hydra.runtime.cwd = str(ROOT)
        cfg.hydra.job.name = "finetune"
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # restored after the test: no Hydra job leaks
    HydraConfig.instance().set_config(cfg)
    argv = ["scripts/finetune.py", "-m", "--config-name=finetune", "freeze.layers=0,all", "trainer=ddp"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None)  # python scripts/finetune.py, not -m pytest
    command, cwd = hydra_job_command(local_rank=1)
    assert command[1] == str(ROOT / "scripts" / "finetune.py") and cwd == str(ROOT)
    assert command[2:] == [
        "--config-name=finetune",
        "freeze.layers=all",
        "trainer=ddp",
        f'hydra.run.dir="{tmp_path / "sweep" / "1"}"',
        "hydra.output_subdir=null",
        "hydra.job.name=finetune_rank1",
        "hydra.job.chdir=False",
    ]


# --- configs of many ranks, built without starting them: multi-node DDP, FSDP --------------------------------


def test_ddp_config_builds_a_two_node_trainer_with_the_hydra_job_launcher():
    from lightning_modules.runtime.parallel import HydraDDPStrategy, HydraJobLauncher

    cfg = make_cfg("pretrain", ["trainer=ddp", "trainer.num_nodes=2", "trainer.devices=2"])
    assert cfg.trainer.strategy.find_unused_parameters is True
    trainer = instantiate(cfg.trainer, logger=False)  # builds, launches nothing
    assert isinstance(trainer.strategy, HydraDDPStrategy) and trainer.world_size == 4
    assert isinstance(trainer.strategy._launcher, HydraJobLauncher)


def test_the_transfer_study_refuses_ddp_stages(tmp_path):
    from lightning_modules.core.errors import ConfigError
    from pretune.commands.transfer_study import _stage_config

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with pytest.raises(ConfigError, match="not supported inside the transfer study"):
            _stage_config("pretrain", ["trainer=ddp"], tmp_path)


def test_fsdp_config_composes_and_instantiates_fsdp2_over_every_rank():
    from pytorch_lightning.strategies import ModelParallelStrategy

    from lightning_modules.runtime.parallel import HydraFSDPStrategy, HydraJobLauncher

    cfg = make_cfg("finetune", ["trainer=fsdp", "trainer.num_nodes=2", "trainer.devices=8"])
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.num_nodes == 2  # (FAST forces accelerator=cpu)
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, HydraFSDPStrategy) and isinstance(strategy, ModelParallelStrategy)
    assert strategy.reshard_after_forward is True and strategy._save_distributed_checkpoint is False
    assert strategy._tensor_parallel_size == 1 and strategy.start_timeout_s == 600
    trainer = instantiate(cfg.trainer, logger=False)  # builds, launches nothing
    assert trainer.world_size == 16 and isinstance(trainer.strategy._launcher, HydraJobLauncher)


def test_start_timeout_is_checked_with_the_config():
    from lightning_modules.config.check import check_config
    from lightning_modules.core.errors import ConfigError

    for bad, shown in (("0", "0"), ("-5", "-5"), ("soon", "'soon'")):
        with pytest.raises(ConfigError, match=rf"trainer.strategy.start_timeout_s={shown} .*: allowed is a number > 0"):
            check_config(make_cfg("finetune", ["trainer=ddp", f"trainer.strategy.start_timeout_s={bad}"]))


# --- end to end through the scripts: 2 processes vs 1 on the same global batch ------------------------------


def _script(name: str, *args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, f"scripts/{name}.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def _max_difference(w1: dict, w2: dict) -> float:
    """The largest weight difference, leaving out attention's key bias: softmax ignores a constant shift,
    so its gradient is 0 up to float noise, which AdamW normalises to steps of about lr (measured: 1.4e-4)."""
    worst = 0.0
    for key, a in w1.items():
        d = (a.float() - w2[key].float()).abs()
        if key.endswith("qkv.bias"):
            n = len(d) // 3
            d = torch.cat([d[:n], d[2 * n :]])
        worst = max(worst, d.max().item())
    return worst


BERT = ["model=bert_micro", "model.dropout=0"]
CASES = {
    # ViT (LayerNorm) and a projection head without BatchNorm: batch statistics would be per rank (SyncBatchNorm
    # is CUDA-only). Augmentations stay on: they are drawn for the global batch.
    "simclr": ("pretrain", ["objective=simclr", "objective.proj_bn=false"]),
    # DINO: the teacher (an EMA, moved after every step) and the center of its outputs (lightly all-reduces the mean
    # of each rank's equal shard) as one process keeps them; two local crops (at the ViT's own size); no BatchNorm.
    "dino": ("pretrain", ["objective=dino", "objective.local_views=2"]),
    # MAE (masks drawn the same way; measured 1.2e-7 apart) is left to the unit test above, for time.
    # Gradual unfreezing: one more group trains in each of the 3 epochs, so DDP must sync groups it saw frozen.
    "gradual": ("finetune", ["freeze=gradual", "freeze.start=1", "freeze.every=1", "trainer.max_epochs=3"]),
    # Text (dropout off: each rank draws its own dropout masks). MLM: masks drawn for the global batch, the loss
    # normalised by the global count of selected tokens; each process trains the same tokenizer on the corpus.
    # One validation batch: masks match only on global batches that split evenly over the ranks (shard_draw), and
    # the 441 validation blocks end in an odd one.
    "mlm": ("pretrain", ["datamodule=text_corpus", *BERT, "objective=mlm", "trainer.limit_val_batches=1"]),
    # Classification of texts padded to the longest of the global batch, then sliced: every rank's slice has the
    # single process's width. The embeddings frozen: a frozen group under DDP.
    "text": ("finetune", ["datamodule=text_classification", *BERT, "freeze.layers=1"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_ddp_on_two_processes_matches_one_process_on_the_same_global_batch(tmp_path, case):
    stage, overrides = CASES[case]
    common = [*TINY, "logger=none", *overrides]
    # The same global batches in training and in evaluation (a text batch's MLM masks and padding are drawn for it).
    one = ["datamodule.batch_size=32", "datamodule.eval_batch_size=256"]
    two = ["datamodule.batch_size=16", "datamodule.eval_batch_size=128", "trainer=ddp"]
    _script(stage, *common, *one, f"hydra.run.dir={tmp_path / 'one'}")
    _script(stage, *common, *two, f"hydra.run.dir={tmp_path / 'two'}")
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert one["status"] == two["status"] == "ok" and one["steps"] == two["steps"] == 3 * one["epochs"]
    for key in ("train/loss", "val/loss", "test/loss", "test/acc"):
        if key in one:
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    # Measured: at most 1.7e-6 (SimCLR), 2.5e-6 (gradual), 2.5e-6 (MLM) and 1.4e-5 (text) apart, from summation
    # order; DDP without the frozen groups registered ends 3.9e-3 apart on the gradual case.
    assert _max_difference(_weights(tmp_path / "one"), _weights(tmp_path / "two")) < 5e-5
    if stage == "pretrain":  # exported once, by rank 0
        assert (tmp_path / "two" / "backbone" / "model.safetensors").is_file()


@pytest.mark.slow
def test_multirun_of_ddp_jobs_writes_one_complete_run_dir_per_job_and_nothing_else(tmp_path):
    # The default sweep dir (a timestamp under paths.log_dir): a child rank that started a sweep of its own,
    # or ran as a single run in hydra.run.dir, would leave a second timestamped dir under tmp_path.
    _script("finetune", "-m", "freeze.layers=0,all", "trainer=ddp", *TINY, "logger=csv", f"paths.log_dir={tmp_path}")
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.iterdir()] == ["multirun"]
    (sweep,) = (tmp_path / "multirun" / "finetune").iterdir()
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]
    frozen = []
    for job in ("0", "1"):
        run = sweep / job
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["status"] == "ok" and "test/acc" in metrics, metrics
        for name in ("config.yaml", ".hydra/overrides.yaml", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
            assert (run / name).is_file(), name
        assert (run / "finetune_rank1.log").is_file()  # rank 1 ran this job, in this dir
        frozen.append(metrics["params/frozen"])
    assert frozen[0] == 0 and frozen[1] > 0


@pytest.mark.slow
def test_a_ddp_job_that_fails_is_recorded_and_the_next_job_gets_fresh_ranks(tmp_path):
    # lr=1e9 diverges at step 1 on both ranks: the job is recorded as failed, its child is reaped, and job 1
    # starts its own process group (neither the old one nor its LOCAL_RANK/MASTER_PORT leak into it).
    sweep = ["-m", "optimizer.lr=1e9,1e-3", "trainer=ddp"]
    _script("finetune", *sweep, *TINY, "logger=none", f"hydra.sweep.dir={tmp_path}")
    failed, ok = (json.loads((tmp_path / job / "metrics.json").read_text()) for job in ("0", "1"))
    assert failed["status"] == "failed" and "train/loss became nan" in failed["error"]
    assert ok["status"] == "ok" and (tmp_path / "1" / "checkpoints" / "best.ckpt").is_file()
