"""Preemption under SLURM, without a cluster: a run that gets the requeue signal in the middle of an epoch saves
``last.ckpt`` at the end of that step, asks SLURM to requeue it (a stand-in ``scontrol`` records the call) and stops
without a result; the requeued job (``SLURM_RESTART_COUNT=1``, the same command in the same run dir) resumes it and
ends with an uninterrupted run's weights and metrics, one ``metrics.json`` and the same W&B run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.test_resume import COMMON
from tests.wandb_log import read_offline_runs

# What SLURM sets for a one-task job; the submitit launcher's jobs see the same.
SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "pretune",
    "SLURM_NTASKS": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "localhost",
}
ARGS = [*COMMON, "freeze=gradual", "freeze.every=1", "trainer.enable_progress_bar=false"]
ARGS += ["logger=wandb", "trainer.log_every_n_steps=1"]


def _launch(run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "scripts/finetune.py", *ARGS, *extra, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _logged_steps(history: list[dict]) -> set:
    """(trainer step, metric) of every value a W&B run logged."""
    return {(row.get("trainer/global_step"), key) for row in history for key in row if not key.startswith("_")}


@pytest.mark.slow
def test_a_signalled_slurm_job_saves_requeues_and_its_requeued_run_ends_as_an_uninterrupted_one(tmp_path):
    full = _launch(tmp_path / "full")
    # The stand-in scontrol records what it was asked; SLURM itself would requeue the job and start it again.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_CALLS"\n')
    (bin_dir / "scontrol").chmod(0o755)
    calls = tmp_path / "scontrol_calls.txt"
    slurm = {**SLURM, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SCONTROL_CALLS": str(calls)}

    marker, go, cut = tmp_path / "at-step", tmp_path / "go", tmp_path / "cut"
    wait = ["+callbacks.wait._target_=tests.helpers.WaitAt", "+callbacks.wait.epoch=2", "+callbacks.wait.batch=1"]
    job = _launch(cut, *wait, f"+callbacks.wait.marker={marker}", f"+callbacks.wait.go={go}", env=slurm)
    deadline = time.time() + 600
    while not marker.exists():
        assert job.poll() is None and time.time() < deadline, job.communicate()[1][-3000:]
        time.sleep(0.2)
    os.kill(job.pid, signal.SIGUSR1)  # what `#SBATCH --signal=USR1@90` sends before the time limit
    go.touch()
    _out, err = job.communicate(timeout=600)
    assert job.returncode == 3, err[-3000:]  # stopped to be requeued: not a failure, not a success
    saved = cut / "checkpoints" / "last.ckpt"
    line = f"requeued: SIGUSR1 received, saved {saved} at step 8; SLURM job 4242 requeued"
    assert line in err.splitlines(), err[-3000:]  # (then W&B's own lines, as the run's logger closes)
    assert calls.read_text().split() == ["requeue", "4242"]
    assert not (cut / "metrics.json").exists()  # no result yet: the run goes on
    assert _weights(cut)["global_step"] == 8  # the end of the step in flight (epoch 2, batch 1), mid-epoch
    first_id = json.loads((cut / "run.json").read_text())["wandb"]["id"]

    # SLURM starts the same command again, in the same run dir: SLURM_RESTART_COUNT tells it that it was requeued.
    requeued = _launch(cut, env={**slurm, "SLURM_RESTART_COUNT": "1"})
    out, err = requeued.communicate(timeout=600)
    assert requeued.returncode == 0, err[-3000:]
    assert f"Restoring states from the checkpoint path at {saved}" in out
    assert full.wait(timeout=600) == 0, full.communicate()[1][-3000:]

    a, b = _weights(tmp_path / "full"), _weights(cut)
    assert a["global_step"] == b["global_step"] == 12
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    full_metrics, resumed = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "full", cut))
    assert resumed["status"] == "ok"
    for key in ("train/loss", "val/loss", "val/acc", "val/acc_best", "test/acc", "test/loss", "steps", "epochs"):
        assert resumed[key] == full_metrics[key], key

    # One W&B run: the requeued attempt continued the run its first attempt recorded in run.json. Offline, each
    # attempt wrote a log under that one id (wandb sync uploads them in order); together they hold what the
    # uninterrupted run logged, no step twice.
    assert json.loads((cut / "run.json").read_text())["wandb"]["id"] == first_id
    attempts = read_offline_runs(cut)
    (uninterrupted,) = read_offline_runs(tmp_path / "full")
    assert [run["id"] for run in attempts] == [first_id, first_id] and uninterrupted["id"] != first_id
    before, after = (_logged_steps(run["history"]) for run in attempts)
    last_before, first_after = max(s for s, _ in before if s is not None), min(s for s, _ in after if s is not None)
    assert not before & after and last_before < first_after == 8  # steps 0..7 trained before the cut, 8.. after
    assert before | after == _logged_steps(uninterrupted["history"])
    assert attempts[1]["summary"]["test/acc"] == pytest.approx(full_metrics["test/acc"])


@pytest.mark.slow
def test_under_submitit_its_handler_requeues_once_the_checkpoint_is_saved(cfg_factory, tmp_path, monkeypatch):
    """Hydra's submitit launcher runs the job in-process with its own USR2 handler (requeue, count, exit): the run
    saves ``last.ckpt`` at the end of the step in flight first, hands the signal on, and ends as requeued."""
    from lightning_modules.core.errors import Requeued
    from lightning_modules.runtime.run import run

    for key, value in SLURM.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")  # an scontrol that must not be called here
    (tmp_path / "scontrol").write_text(f"#!/bin/sh\ntouch {tmp_path / 'scontrol_called'}\n")
    (tmp_path / "scontrol").chmod(0o755)
    saved = tmp_path / "finetune" / "checkpoints" / "last.ckpt"
    handed = []

    def submitit(signum, frame):  # what submitit's SignalHandler.checkpoint_and_try_requeue does on rank 0
        handed.append((signum, torch.load(saved, weights_only=True)["global_step"]))
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, submitit)
    try:
        send = ["+callbacks.signal._target_=tests.helpers.SignalAt", "+callbacks.signal.step=4"]
        cfg = cfg_factory("finetune", *COMMON, *send, f"+callbacks.signal.signum={int(signal.SIGUSR2)}")
        with pytest.raises(Requeued) as stop:
            run(cfg)
        assert signal.getsignal(signal.SIGUSR2) is submitit  # put back once the run stopped
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert stop.value.code == 3 and handed == [(signal.SIGUSR2, 5)]  # saved at the end of step 5, then handed on
    assert not (tmp_path / "scontrol_called").exists()  # submitit requeues, not pretune a second time
    assert not (tmp_path / "finetune" / "metrics.json").exists()
