"""Two nodes on the loopback address: the same command started twice (``trainer.num_nodes=2``, one process each,
``NODE_RANK=0/1``, ``MASTER_ADDR=127.0.0.1``, a free port, one shared run dir) trains as one process does on the
same global batch, and only global rank 0 writes into the run dir; a node whose peer never arrives fails in one
line within ``trainer.strategy.start_timeout_s``, instead of waiting forever."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.test_ddp import CASES, TINY, _free_port, _max_difference, _script, _weights

# Every path a process opens for writing (or makes, renames, removes) under AUDIT_ROOT, appended to AUDIT_LOG: loaded
# into node 1 as sitecustomize, so the test sees what that node wrote into the shared run dir.
AUDIT = """
import os, sys
_root, _log = os.environ["AUDIT_ROOT"], os.environ["AUDIT_LOG"]
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def _hook(event, args):
    if event == "open":
        mode, flags = args[1], args[2] if len(args) > 2 else 0
        if not ((isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & _WRITE):
            return
        paths = args[:1]
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.symlink", "os.link"):
        paths = args[:1]
    elif event == "os.rename":
        paths = args[:2]
    else:
        return
    for path in paths:
        if isinstance(path, (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(path))
            if path.startswith(_root):
                with open(_log, "a") as fh:
                    fh.write(path + "\\n")

sys.addaudithook(_hook)
"""


def _node(stage: str, args: list[str], node: int, port: int, extra: dict | None = None) -> subprocess.Popen:
    """One node of a two-node run on this machine: a process of its own, as a node's launcher would start it."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK")}
    env.update(
        OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(node), **(extra or {})
    )
    command = [sys.executable, f"scripts/{stage}.py", *args, "trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2"]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        _out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, err = proc.communicate()
    return proc.returncode, err


@pytest.mark.slow
def test_two_nodes_on_loopback_match_one_process_and_only_rank_zero_writes(tmp_path):
    # SimCLR, whose loss gathers both nodes' embeddings; text over DDP is tests/test_ddp.py's (one case here: each
    # costs three processes' start-up and a run)
    stage, overrides = CASES["simclr"]  # the DDP tests' case, with its tolerance
    common = [*TINY, "logger=none", *overrides]
    run = tmp_path / "two"
    audit = tmp_path / "audit"
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(AUDIT)
    node_env = {"PYTHONPATH": f"{audit}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    node_env |= {"AUDIT_ROOT": str(run), "AUDIT_LOG": str(tmp_path / "node1_writes.txt")}
    per_node = ["datamodule.batch_size=16", "datamodule.eval_batch_size=128", f"hydra.run.dir={run}"]
    port = _free_port()
    nodes = [_node(stage, [*common, *per_node], 0, port), _node(stage, [*common, *per_node], 1, port, node_env)]
    one = ["datamodule.batch_size=32", "datamodule.eval_batch_size=256", f"hydra.run.dir={tmp_path / 'one'}"]
    _script(stage, *common, *one)  # meanwhile: the same global batches on one process
    for node in nodes:
        code, err = _finish(node)
        assert code == 0, err[-3000:]

    single, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert single["status"] == two["status"] == "ok" and single["steps"] == two["steps"] == 3 * single["epochs"]
    for key in ("train/loss", "val/loss", "test/loss", "test/acc"):
        if key in single:
            assert two[key] == pytest.approx(single[key], rel=1e-5, abs=1e-6), key
    assert _max_difference(_weights(tmp_path / "one"), _weights(run)) < 5e-5
    # Node 1 (global rank 1) wrote nothing into the shared run dir but its own log (Hydra makes the dir on every
    # node: a mkdir of the dir itself); rank 0 wrote the run's files.
    written = set((tmp_path / "node1_writes.txt").read_text().split()) - {str(run)}
    assert written == {str(run / f"{stage}_node1.log")}, written
    for name in ("config.yaml", "run.json", "metrics.json", ".hydra/config.yaml", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    assert (run / "backbone" / "model.safetensors").is_file() == (stage == "pretrain")


@pytest.mark.slow
def test_a_node_whose_peer_never_arrives_fails_in_one_line_within_the_timeout(tmp_path):
    # Node 0 alone (its store waits for node 1) and node 1 alone (no store to reach), each on a port of its own.
    args = [*TINY, "logger=none", "trainer.strategy.start_timeout_s=5"]
    started = time.time()
    alone = {
        node: _node("finetune", [*args, f"hydra.run.dir={tmp_path / str(node)}"], node, _free_port()) for node in (0, 1)
    }
    for node, proc in alone.items():
        code, err = _finish(proc, timeout=240)
        last = err.strip().splitlines()[-1]
        assert code == 2, err[-3000:]
        assert last.startswith(
            "error: trainer.strategy.start_timeout_s=5: not every process of trainer.num_nodes=2 x trainer.devices=1"
            f" arrived in time (this is node {node}, rank {node}; MASTER_ADDR=127.0.0.1"
        ), last
        assert ("waiting for clients. 1/2 clients joined" if node == 0 else "timed out") in last, last
    # Each gave up after its 5 s (plus the start of Python, torch and the data): nowhere near the default 600 s.
    assert time.time() - started < 200
    failed = json.loads((tmp_path / "0" / "metrics.json").read_text())
    assert failed["status"] == "failed" and "start_timeout_s=5" in failed["error"]
    assert not (tmp_path / "1" / "metrics.json").exists()  # node 1 is not global rank 0: it writes no result


@pytest.fixture
def process_rank_kept(monkeypatch):
    """A Trainer instantiated as node 1 sets Lightning's process-wide rank (``rank_zero_only.rank``); put back, or
    every later test in this process runs as rank 1 (a W&B logger's run a dummy, ``rank_zero_info`` silent)."""
    import lightning_fabric.utilities.rank_zero as fabric_rank
    import pytorch_lightning.utilities.rank_zero as pl_rank

    for module in (fabric_rank, pl_rank):
        monkeypatch.setattr(module.rank_zero_only, "rank", getattr(module.rank_zero_only, "rank", 0))


def test_a_hand_started_node_needs_its_port_and_rank(monkeypatch, process_rank_kept):
    from hydra.utils import instantiate

    from lightning_modules.core.errors import ConfigError
    from lightning_modules.runtime.preflight import check_launcher
    from tests.conftest import make_cfg

    cfg = make_cfg("finetune", ["trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2"])
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    for var in ("MASTER_PORT", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
    trainer = instantiate(cfg.trainer, logger=False)
    with pytest.raises(ConfigError, match=r"trainer.num_nodes=2 with MASTER_ADDR set by hand also needs MASTER_PORT"):
        check_launcher(cfg.trainer, trainer)
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("NODE_RANK", "1")
    check_launcher(cfg.trainer, instantiate(cfg.trainer, logger=False))


def test_node_one_keeps_its_own_log_and_no_second_hydra_dir(monkeypatch):
    from lightning_modules.runtime.cli import this_node

    argv = ["scripts/pretrain.py", "trainer=ddp"]
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("NODE_RANK", "0")
    assert this_node(argv) == argv
    monkeypatch.setenv("NODE_RANK", "1")
    assert this_node(argv) == [*argv, "hydra.output_subdir=null", "hydra.job.name=pretrain_node1"]
    monkeypatch.setenv("LOCAL_RANK", "1")  # a child rank of node 1: its launcher already gave it its own
    assert this_node(argv) == argv
    from lightning_modules.core.results import is_rank_zero

    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not is_rank_zero()  # node 1's first process is not global rank 0
    monkeypatch.setenv("NODE_RANK", "0")
    assert is_rank_zero()
