"""Lightning's DDP and FSDP strategies, fitted to Hydra jobs, to freezing and to several nodes
(``conf/trainer/ddp.yaml``, ``fsdp.yaml``).

Four things differ from ``pytorch_lightning.strategies.DDPStrategy`` (1, 3 and 4 also for FSDP):

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
4. **A node that never arrives is one line, not a hang.** The process group's start (the TCP store's wait
   for every rank, gloo's or NCCL's connections) is bounded by ``start_timeout_s``, and fails naming it; the
   collectives after it keep Lightning's timeout (``timeout``, 30 minutes), which a long checkpoint write or
   validation on one rank must not hit.

FSDP is FSDP2 (torch's ``fully_shard``, per-parameter sharding) through Lightning's ``ModelParallelStrategy``,
one FSDP unit per layer group of the backbone: it trains on CPU processes over gloo as on GPUs over NCCL, and
since each parameter is sharded on its own, frozen and trainable parameters mix freely in a unit and a group
unfrozen mid-run (gradual, LP-FT) gets its gradients reduced like any other (FSDP1, Lightning's
``FSDPStrategy``, flattens a unit's parameters into one and refuses the CPU: ``tests/test_fsdp.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import timedelta

import torch
import torch.distributed as dist
from lightning_fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning_fabric.strategies.launchers.subprocess_script import _basic_subprocess_cmd, _ChildProcessObserver
from lightning_fabric.utilities.distributed import _set_num_threads_if_needed
from pytorch_lightning.strategies import DDPStrategy, ModelParallelStrategy
from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from lightning_modules.config.rules import check
from lightning_modules.core.errors import ConfigError, message_of

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
    """Mixin for Lightning strategies that start their ranks with the subprocess-script launcher. ``start_timeout_s``
    bounds the process group's start (the mixin's ``__init__`` takes it; the rest go to the strategy)."""

    def __init__(self, *args, start_timeout_s: float = 600, **kwargs):
        super().__init__(*args, **kwargs)
        self.start_timeout_s = check("trainer.strategy.start_timeout_s", start_timeout_s)

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _SubprocessScriptLauncher):  # ranks started by this process
            self._launcher = HydraJobLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    def _start_process_group(self, start) -> None:
        """``start()`` (Lightning's process group start) with ``start_timeout_s`` as its timeout: the TCP store
        waits that long for every rank (or, on the other nodes, for the store to answer); then the collectives'
        own timeout. A rank that never came is one line naming the key."""
        collectives, self._timeout = self._timeout, timedelta(seconds=self.start_timeout_s)
        try:
            start()
        except dist.DistError as err:
            env = self.cluster_environment
            raise ConfigError(
                f"trainer.strategy.start_timeout_s={self.start_timeout_s}: not every process of trainer.num_nodes="
                f"{self.num_nodes} x trainer.devices={self.num_processes} arrived in time (this is node"
                f" {env.node_rank()}, rank {env.global_rank()}; MASTER_ADDR={env.main_address}"
                f" MASTER_PORT={env.main_port}): {message_of(err)}"
            ) from err
        finally:
            self._timeout = collectives
        if collectives is not None:
            dist.set_timeout(collectives)

    def close(self, failed: bool = False) -> None:
        """End of the job (after fit and test): children done, process group gone, environment restored."""
        if isinstance(self._launcher, HydraJobLauncher):
            self._launcher.close(failed)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


class HydraDDPStrategy(_HydraJobs, DDPStrategy):
    """``DDPStrategy`` for pretune: Hydra-job children, frozen parameters registered, a bounded start, ``close()``."""

    def setup_distributed(self) -> None:
        self._start_process_group(super().setup_distributed)

    def _setup_model(self, model):
        frozen = [p for p in model.parameters() if not p.requires_grad]
        for p in frozen:  # registered now, so their gradients are all-reduced once unfrozen
            p.requires_grad_(True)
        try:
            return super()._setup_model(model)
        finally:
            for p in frozen:
                p.requires_grad_(False)


class HydraFSDPStrategy(_HydraJobs, ModelParallelStrategy):
    """FSDP2 over every rank (data parallel, no tensor parallelism), one unit per layer group (``shard``), with
    Hydra-job children, a bounded start and ``close()``. ``reshard_after_forward``: free each unit's gathered
    parameters after its forward (FULL_SHARD's memory) or keep them for the backward (SHARD_GRAD_OP's speed).
    Checkpoints hold whole tensors, gathered on rank 0 (``save_distributed_checkpoint=false``): they load like DDP
    ones, into any number of ranks; ``true`` writes a folder with one shard per rank instead."""

    def __init__(
        self,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        **kwargs,
    ):
        super().__init__(
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
            **kwargs,
        )
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every rank holds a shard
        super().setup_environment()

    def _setup_distributed(self) -> None:
        self._start_process_group(super()._setup_distributed)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        """As Lightning's, with two fixes. Only a fit restores optimizers: testing ``best.ckpt`` (weights only) after
        the fit would otherwise look in it for the fit's optimizer states, which it does not hold. And while the
        optimizer's state loads, exactly the parameters the checkpoint holds a state for count as trainable: torch's
        loader (``set_optimizer_state_dict``) loads the states of the parameters that require grad at that moment
        (and refuses one that requires grad but has none saved). On a resume the freezing callbacks put the
        checkpoint's epoch in place only later (the epoch-0 state stands until then), so the state of a group
        unfrozen since would be dropped, and its next steps would differ from the uninterrupted run's
        (tests/test_fsdp.py)."""
        from pytorch_lightning.trainer.states import TrainerFn

        if self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
            optimizers, self.optimizers = self.optimizers, []
            try:
                return super().load_checkpoint(checkpoint_path, weights_only)
            finally:
                self.optimizers = optimizers
        saved = _params_with_saved_state(checkpoint_path, self.lightning_module)
        params = dict(self.lightning_module.named_parameters())
        flipped = [p for name, p in params.items() if saved is not None and p.requires_grad != (name in saved)]
        for p in flipped:
            p.requires_grad_(not p.requires_grad)
        try:
            return super().load_checkpoint(checkpoint_path, weights_only)
        finally:
            for p in flipped:
                p.requires_grad_(not p.requires_grad)

    def shard(self, module) -> None:
        """Apply ``fully_shard`` to ``module`` (a ``PretuneModule``, from its ``configure_model``): one unit per
        layer group (the group's outermost modules), then the root unit for the rest (the objective's heads, and
        parameters no whole module of a group holds, e.g. a ViT's position embedding). A group with a parameter
        that a module outside it also holds (an output layer tied to the embeddings) stays in the root unit:
        FSDP2 shards a parameter in one unit only. Run again for testing, it finds the module sharded."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(module, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        held = _holders(module)
        for group in module.backbone.layer_groups():
            units = _outermost(group.modules)
            inside = _holders(*units)
            if units and all(held[p] == inside[p] for p in inside):
                fully_shard(units, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        fully_shard(module, mesh=mesh, reshard_after_forward=self.reshard_after_forward)


def _params_with_saved_state(checkpoint_path, module) -> set[str] | None:
    """The names of the parameters a full checkpoint holds an optimizer state for (None for a folder of shards).
    Lightning keys those states by parameter index; torch's rekeying names them, as Lightning's loader does."""
    from torch.distributed.fsdp import FullyShardedDataParallel, OptimStateKeyType

    if not os.path.isfile(checkpoint_path):
        return None
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
    names: set[str] = set()
    for state in checkpoint.get("optimizer_states", []):
        if state.get("state"):
            named = FullyShardedDataParallel.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_NAME, module)
            names |= set(named["state"])
    return names


def _holders(*modules) -> dict[int, int]:
    """How many modules under ``modules`` hold each parameter (by id): a tied parameter counts twice."""
    counts: dict[int, int] = {}
    for module in modules:
        for _, p in module.named_parameters(remove_duplicate=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
    return counts


def _outermost(modules: list) -> list:
    """Those of ``modules`` that are not inside another one of them."""
    nested = {id(child) for m in modules for child in m.modules() if child is not m}
    return [m for m in modules if id(m) not in nested and any(True for _ in m.parameters())]
