"""Lightning's DDP and FSDP strategies, fitted to Hydra jobs and to freezing (``conf/trainer/ddp.yaml``,
``fsdp.yaml``).

Three things differ from ``pytorch_lightning.strategies.DDPStrategy`` (1 and 3 also for FSDP):

1. **Child processes re-run this job, not the command line.** Lightning starts ranks 1..N-1 by re-running
   ``sys.argv`` plus ``hydra.run.dir=<hydra.run.dir>``. In a multirun that command still holds ``-m`` and
   the sweep lists, so every child starts a sweep of its own, and the run dir it is given is not the job's
   (Lightning #11300, hydra #2070, lightning-hydra-template #393). Here a child gets the script, the
   job's own overrides (``hydra.overrides.task``), ``hydra.run.dir=<this job's output dir>`` and
   ``hydra.output_subdir=null``: a single run that composes the same config and writes into the same dir.
2. **Every parameter is registered with DDP, frozen or not.** DDP only all-reduces the gradients of
   parameters that required grad when it was built. Freezing happens before that (``BaseFinetuning.setup``),
   so a group unfrozen later (``freeze=gradual``, ``lp_ft``) would train on each rank's own gradients and
   the replicas would drift apart silently (Lightning #20340). Frozen parameters then get no gradient,
   which ``find_unused_parameters=True`` accepts (Lightning #17212).
3. **``close()`` ends the job's process group.** Several jobs in one process (a sweep, the transfer study)
   each start their own ranks; the previous job's process group and its ``LOCAL_RANK``/``MASTER_PORT``
   variables would otherwise make the next job believe its ranks already exist, and hang.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import torch.distributed as dist
from lightning_fabric.strategies.launchers.subprocess_script import _basic_subprocess_cmd, _ChildProcessObserver
from lightning_fabric.utilities.distributed import _set_num_threads_if_needed
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy
from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

# What the launcher puts into this process's environment for the children (and Lightning then reads back).
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
_CHILD_EXIT_S = 120


def hydra_job_command(local_rank: int) -> tuple[list[str], str]:
    """The command that runs this Hydra job again as rank ``local_rank``, and the directory to run it in."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    hydra_cfg = HydraConfig.get()
    if __main__.__spec__ is None:  # python path/to/script.py
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:  # python -m package.module
        command = [sys.executable, "-m", __main__.__spec__.name]
    # The same primary config (--config-path/-name/-dir), but none of -m, --cfg or the sweep's lists.
    args = get_args_parser().parse_args(sys.argv[1:])
    for flag in ("config_path", "config_name", "config_dir"):
        if getattr(args, flag):
            command.append(f"--{flag.replace('_', '-')}={getattr(args, flag)}")
    command += list(hydra_cfg.overrides.task)  # this job's overrides, as the sweeper chose them
    command += [
        f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"',  # this job's dir (absolute), not hydra.run.dir
        "hydra.output_subdir=null",  # the job's .hydra/ stays as the sweep wrote it
        f"hydra.job.name={hydra_cfg.job.name}_rank{local_rank}",  # its own log file, in the same dir
    ]
    if hydra_cfg.job.chdir is not None:
        command.append(f"hydra.job.chdir={hydra_cfg.job.chdir}")
    return command, get_original_cwd()


class _StoppableObserver(_ChildProcessObserver):
    """Lightning's watchdog (a child that dies takes the whole group down, rather than leaving it hanging in
    a collective), which ``stop()`` retires once the job is over, before its children are reaped or killed."""

    def __init__(self, child_processes: list) -> None:
        super().__init__(main_pid=os.getpid(), child_processes=child_processes)
        self._lock, self._stopped = threading.Lock(), False

    def _run(self) -> bool:
        with self._lock:
            return self._stopped or super()._run()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True


class HydraJobLauncher(_SubprocessScriptLauncher):
    """Starts ranks 1..N-1 of this node with ``hydra_job_command``; remembers the environment it changed."""

    def launch(self, function, *args, trainer=None, **kwargs):
        # As Lightning's, with a watchdog that close() can stop: the next job of a sweep must survive
        # the children of this one being killed after a failure.
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            self.observer = _StoppableObserver(self.procs)
            self.observer.start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)

    def _call_children_scripts(self) -> None:
        from hydra.core.hydra_config import HydraConfig

        self._check_can_spawn_children()
        self.saved_env = {key: os.environ.get(key) for key in _DDP_ENV}
        env = self.cluster_environment
        os.environ.update(
            MASTER_ADDR=env.main_address,
            MASTER_PORT=str(env.main_port),
            NODE_RANK=str(env.node_rank()),
            LOCAL_RANK=str(env.local_rank()),
            WORLD_SIZE=str(self.num_processes * self.num_nodes),
        )
        self.procs = []
        for local_rank in range(1, self.num_processes):
            if HydraConfig.initialized():
                command, cwd = hydra_job_command(local_rank)
            else:  # run() called from plain Python: Lightning's own rule, re-run the command line
                command, cwd = _basic_subprocess_cmd(), None
            self.procs.append(subprocess.Popen(command, env=dict(os.environ, LOCAL_RANK=str(local_rank)), cwd=cwd))

    def close(self, failed: bool = False) -> None:
        """Wait for the children to finish the job, then give the environment back as it was. After a
        failure on this rank they are killed: Lightning kills them only on Ctrl-C, and they would otherwise
        wait in a collective for the process group's timeout (30 minutes)."""
        if getattr(self, "observer", None) is not None:
            self.observer.stop()
        for proc in self.procs:
            if failed:
                proc.kill()
            try:  # past the job's last collective a child only has to exit
                proc.wait(timeout=_CHILD_EXIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for key, value in getattr(self, "saved_env", {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _HydraJobs:
    """Mixin for Lightning strategies that start their ranks with the subprocess-script launcher."""

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _SubprocessScriptLauncher):  # ranks started by this process
            self._launcher = HydraJobLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    def close(self, failed: bool = False) -> None:
        """End of the job (after fit and test): children done, process group gone, environment restored."""
        if isinstance(self._launcher, HydraJobLauncher):
            self._launcher.close(failed)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


class HydraDDPStrategy(_HydraJobs, DDPStrategy):
    """``DDPStrategy`` for pretune: Hydra-job children, frozen parameters registered, ``close()``."""

    def _setup_model(self, model):
        frozen = [p for p in model.parameters() if not p.requires_grad]
        for p in frozen:  # registered now, so their gradients are all-reduced once unfrozen
            p.requires_grad_(True)
        try:
            return super()._setup_model(model)
        finally:
            for p in frozen:
                p.requires_grad_(False)


class HydraFSDPStrategy(_HydraJobs, FSDPStrategy):
    """``FSDPStrategy`` with Hydra-job children and ``close()``. Frozen groups need ``use_orig_params=True``
    (``conf/trainer/fsdp.yaml``); unfreezing mid-run (gradual, LP-FT) is not supported under FSDP."""
