"""A SLURM job told that it is about to end (preempted, or near its time limit) saves ``last.ckpt`` at the end of the
training step in flight, is requeued, and stops; the requeued job resumes that checkpoint in the same run dir
(``ckpt_path=last``, which a requeued job implies: ``requeued_job``), so it ends with an uninterrupted run's weights,
one ``metrics.json`` and one W&B run (``runtime/wandb_runs.py: run_id``).

SLURM signals a job ahead of its end when asked to: ``#SBATCH --signal=USR1@<seconds>`` (Lightning's convention),
or USR2 under Hydra's submitit launcher (``hydra.launcher.signal_delay_s``). Lightning's own handler
(``SLURMEnvironment(auto_requeue=True)``) saves an ``hpc_ckpt_<n>.ckpt`` from inside the signal handler, that is
wherever the step happens to be (an optimizer update half applied, one rank ahead of another), marks the loggers
finished, and trains on until SLURM kills the job. Here the handler only notes the signal, and Lightning's is turned
off; at the end of the step every rank learns whether any rank got it (one small all-reduce a step, only under
SLURM with several ranks), all save ``last.ckpt`` there, as the step-cadence checkpoint does (which resumes exactly:
``tests/test_resume.py``), and the job is requeued: by the signal's previous handler when there is one (submitit's,
which also counts the job's requeues), else by ``scontrol requeue`` from rank 0, as Lightning does. The run then ends
with ``Requeued``: an exit, not a failure, so no ``metrics.json`` is written and a submitit job records no result.
A signal that comes while testing (the fit complete, its ``last.ckpt`` final) requeues at once; the requeued job
finds the fit done and tests again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.callbacks import Callback

from lightning_modules.core.errors import Requeued

SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def requeued_job() -> bool:
    """Whether this process is a SLURM job that was requeued (``SLURM_RESTART_COUNT``: 1 and up): it continues
    where the job stopped."""
    return SLURMEnvironment.detect() and int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def slurm_job() -> str:
    """The job ``scontrol requeue`` takes: ``<array job>_<task>`` for a task of an array (a sweep), else the job."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]


class Requeue(Callback):
    """``checkpoint``: the run's ``last.ckpt`` (what ``ckpt_path=last`` resumes). Inert outside SLURM."""

    def __init__(self, checkpoint: Path):
        self.checkpoint = Path(checkpoint)
        self.signalled: int | None = None
        self._previous: dict = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        environment = trainer._accelerator_connector.cluster_environment
        if isinstance(environment, SLURMEnvironment):  # Lightning's handler, registered after setup, stays out
            environment.auto_requeue = False

    # Installed once Lightning has registered its handlers (it puts back what it found when it tears down), for
    # the training (validation included) and for testing; the previous handlers put back after each.
    def on_train_start(self, trainer, pl_module) -> None:
        self._install()

    def on_test_start(self, trainer, pl_module) -> None:
        self._install()

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_test_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def _install(self) -> None:
        if SLURMEnvironment.detect() and threading.current_thread() is threading.main_thread():
            self.signalled = None
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._note)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _note(self, signum, frame) -> None:
        self.signalled = signum

    def _agreed(self, trainer) -> bool:
        """Whether any rank got the signal (the same answer on every rank)."""
        if not self._previous:
            return False
        stop = self.signalled is not None
        return trainer.strategy.reduce_boolean_decision(stop, all=False) if trainer.world_size > 1 else stop

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._agreed(trainer):
            trainer.save_checkpoint(self.checkpoint)  # every rank: FSDP gathers the whole state for rank 0
            trainer.strategy.checkpoint_io.teardown()  # a write in the background finished, before SLURM stops us
            self._requeue(trainer, f"saved {self.checkpoint} at step {trainer.global_step}")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._agreed(trainer):
            self._requeue(trainer, "while testing: the fit is complete")

    def _requeue(self, trainer, what: str) -> None:
        signum = self.signalled or SIGNALS[0]  # another rank got it
        previous = self._previous.get(signum)
        self._restore()
        for logger in trainer.loggers if trainer.is_global_zero else []:
            if type(logger).__name__ == "WandbLogger":
                logger.experiment.mark_preempting()  # W&B shows the run as preempted, then resumed
        if callable(previous):  # submitit's: requeues the job (rank 0), counts it, and exits
            try:
                previous(signum, None)
            except SystemExit:
                pass
        elif trainer.is_global_zero:
            subprocess.run(["scontrol", "requeue", slurm_job()], check=True, timeout=60)
        if trainer.is_global_zero:
            name = signal.Signals(signum).name
            print(f"requeued: {name} received, {what}; SLURM job {slurm_job()} requeued", file=sys.stderr, flush=True)
        raise Requeued()
