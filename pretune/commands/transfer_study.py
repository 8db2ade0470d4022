"""The main job: what did pre-training buy? Pre-train once, then fine-tune from scratch, from the
pre-trained backbone under several strategies and from ImageNet weights, at low label fractions, over
several seeds, each strategy at its own best learning rate (chosen on validation), and write a report.
The same study on text (``conf/transfer_study_text.yaml``): MLM pre-training on the embedded corpus, then the
embedded labeled task from scratch, from that backbone and from MiniLM.

    pretune study                 # what `make run` runs (python scripts/transfer_study.py in a checkout)
    pretune study 'seeds=[0,1,2,3,4]' 'label_fractions=[0.02,0.1]'
    pretune study --config-name transfer_study_text   # what `make run-text` runs
"""

import sys
import time
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from lightning_modules.config.check import check_config, check_values
from lightning_modules.config.rules import STUDY_RULES
from lightning_modules.core.cores import threads_per_job
from lightning_modules.core.errors import ConfigError
from lightning_modules.reports.transfer import monitored, select_and_summarise, write_report
from lightning_modules.runtime.failure import report as report_failure
from lightning_modules.runtime.failure import warnings_to_log
from pretune.commands.app import CONFIG_PATH, launch


def _stage_config(stage: str, overrides: list[str], out_dir: Path, pending: tuple = ()) -> DictConfig:
    """A stage's config as its script would compose it, checked (before anything heavy is imported);
    ``pending``: keys whose value does not exist yet (the pre-training run's backbone, before it ran)."""
    from hydra import compose

    cfg = compose(config_name=stage, overrides=[*overrides, f"paths.output_dir={out_dir}"])
    check_config(cfg, pending)
    # A DDP/FSDP rank re-runs its Hydra job: here that would be the whole study, once per rank.
    if "parallel." in str(OmegaConf.select(cfg, "trainer.strategy._target_", default="")):
        raise ConfigError(
            "trainer=ddp/fsdp is not supported inside the transfer study (its stages run in one process);"
            " run scripts/pretrain.py and scripts/finetune.py with trainer=ddp instead"
        )
    return cfg


def _quiet_console() -> None:
    """Dozens of runs in one process: keep the console to one line per run (in the study and in each worker)."""
    import logging
    import warnings

    import pytorch_lightning  # noqa: F401  (imported first: it sets its loggers to INFO on import)

    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")


def _worker_init(threads: int) -> None:
    """A worker process of the study's pool: its share of the cores, and the study's quiet console."""
    import torch

    torch.set_num_threads(threads)
    _quiet_console()
    warnings_to_log()


def _run_composed(cfg: DictConfig) -> dict:
    """A stage whose config the study composed and checked (in a pool's worker too: no Hydra context needed)."""
    from lightning_modules.runtime.run import run  # imports torch: only once the study is checked

    return run(cfg)


class _InProcess:
    """The pool's interface run in the study's own process (workers=1): each stage runs when submitted, in order,
    on all the cores."""

    def submit(self, fn, *args) -> Future:
        future = Future()
        future.set_result(fn(*args))  # a failure raises here: the study stops at once
        return future

    def shutdown(self, **_) -> None:
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def stage_pool(workers: int):
    """Where the study's stages run: in this process (1), or side by side in ``workers`` spawned processes, each
    with cores / workers torch threads (small models on a few cores leave cores idle in Python between ops; two runs
    side by side fill them). Each run seeds itself, so where and when it ran does not change its result; the thread
    count can (float sums in another order), so a study's numbers are those of its ``workers`` on its cores."""
    if workers == 1:
        _quiet_console()  # only here: with workers the study's own process trains nothing (and skips its ~7 s import)
        return _InProcess()
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = threads_per_job(workers)
    context = multiprocessing.get_context("spawn")  # not fork: torch's threads and Lightning's state stay behind
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=(threads,))


def _init(strategy: DictConfig, pre_dir: Path) -> str | None:
    """Where a strategy's weights come from: this study's pre-training run, none (random), or None for the model
    config's own model.init (``init: model``: weights from elsewhere, e.g. ImageNet's or MiniLM's)."""
    return None if strategy.get("init") == "model" else str(pre_dir) if strategy.pretrained else "none"


def _finetune_overrides(cfg: DictConfig, name: str, pre_dir: Path, fraction: float, lr: float, seed: int) -> list[str]:
    """A fine-tuning job's overrides (``pre_dir``: this study's pre-training run). ``tokenizer: pretrained``:
    random weights on that run's vocabulary (model.tokenizer)."""
    strategy = cfg.strategies[name]
    init = _init(strategy, pre_dir)
    return [
        *cfg.common,
        *cfg.finetune,
        *strategy.overrides,
        *([f"model.init={init}"] if init is not None else []),
        *([f"model.tokenizer={pre_dir}"] if strategy.get("tokenizer") == "pretrained" else []),
        f"datamodule.label_fraction={fraction}",
        f"optimizer.lr={lr}",
        f"seed={seed}",
    ]


def check_study(cfg: DictConfig, study_dir: Path) -> None:
    """The study's own values, then every stage config it will compose (each strategy once; model.init of the
    pre-trained ones is pending: the backbone does not exist yet), so a bad override fails now, not after the
    pre-training."""
    from hydra.errors import HydraException

    check_values(cfg, STUDY_RULES)
    if "scratch" not in cfg.strategies:
        raise ConfigError("strategies has no scratch entry: the report compares every strategy with it")
    stages = {"pretrain": ([*cfg.common, *cfg.pretrain], ())}
    for name, strategy in cfg.strategies.items():
        fraction = strategy.get("label_fractions", cfg.label_fractions)[0]
        overrides = _finetune_overrides(cfg, name, study_dir / "pretrain", fraction, strategy.lrs[0], cfg.seeds[0])
        # what this study's pre-training run will provide is not there yet: checked once it is
        pending = ("model.init",) if strategy.pretrained and strategy.get("init") != "model" else ()
        pending += ("model.tokenizer",) if strategy.get("tokenizer") == "pretrained" else ()
        stages[f"strategies.{name}"] = (overrides, pending)
    for where, (overrides, pending) in stages.items():
        try:
            stage = "pretrain" if where == "pretrain" else "finetune"
            _stage_config(stage, overrides, study_dir / "check", pending)
        except HydraException as err:  # an override Hydra cannot apply (unknown key, bad syntax)
            raise ConfigError(f"{where}: {str(err).splitlines()[0]}") from err
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from err


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="transfer_study")
def app(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    warnings_to_log()
    study_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        report = study(cfg, study_dir)
    except Exception as err:
        sys.exit(report_failure(err, study_dir))  # one line (HYDRA_FULL_ERROR=1: the traceback)
    print(f"\nReport: {report}")


def time_left(elapsed: float, done: int, total: int) -> str:
    """The estimate printed after each fine-tuning run: the mean time of the finished runs times the runs left
    (strategies differ in cost, so it firms up as the study goes)."""
    if done >= total:
        return "done"
    seconds = round(elapsed / done * (total - done))
    minutes, seconds = divmod(seconds, 60)
    return f"~{minutes} min {seconds:02d} s left" if minutes else f"~{seconds} s left"


def study(cfg: DictConfig, study_dir: Path) -> Path:
    check_study(cfg, study_dir)
    started = time.time()
    pre_dir = study_dir / "pretrain"
    # Pre-train only when a strategy starts from this study's backbone (init: model strategies bring their own),
    # or takes its tokenizer (tokenizer: pretrained).
    uses = lambda s: (s.pretrained and s.get("init") != "model") or s.get("tokenizer") == "pretrained"  # noqa: E731
    jobs = [
        (fraction, name, lr, seed)
        for fraction in cfg.label_fractions
        for name, strategy in cfg.strategies.items()
        if fraction in strategy.get("label_fractions", cfg.label_fractions)
        for lr in strategy.lrs
        for seed in cfg.seeds
    ]
    out_dirs = [study_dir / "finetune" / f"labels{f:g}_{name}_lr{lr:g}_seed{seed}" for f, name, lr, seed in jobs]
    futures: list[Future | None] = [None] * len(jobs)
    finished = []

    def done(i: int, future: Future) -> None:
        if future.exception() is not None:
            return  # raised below, where the study waits
        finished.append(i)
        fraction, name, lr, seed = jobs[i]
        m = future.result()
        print(
            f"[{len(finished):>2}/{len(jobs)}] labels={fraction:<5g} {name:<14} lr={lr:<7g} seed={seed}:"
            f" val/acc {m['val/acc_best']:.3f}  test/acc {m['test/acc']:.3f}  ({m['time/run_s']:.1f}s)"
            f"  {time_left(time.time() - started, len(finished), len(jobs))}",
            flush=True,
        )

    def submit(pool, indices) -> None:
        for i in indices:
            fraction, name, lr, seed = jobs[i]
            # init: model keeps the model config's own model.init (weights from elsewhere, e.g. ImageNet's)
            overrides = _finetune_overrides(cfg, name, pre_dir, fraction, lr, seed)
            futures[i] = pool.submit(_run_composed, _stage_config("finetune", overrides, out_dirs[i]))
            futures[i].add_done_callback(lambda future, i=i: done(i, future))

    def pretrained(future: Future) -> None:
        if future.exception() is None:
            m = future.result()
            print(
                f"  pre-training done in {m['time/run_s']:.0f}s, val/loss {m['val/loss']:.3f}{monitored(m)}", flush=True
            )

    needs = [i for i, job in enumerate(jobs) if uses(cfg.strategies[job[1]])]
    pre = None
    with stage_pool(int(cfg.workers)) as pool:
        try:
            if needs:
                print(f"pre-training ({' '.join(cfg.pretrain)}) ...", flush=True)
                pre_cfg = _stage_config("pretrain", [*cfg.common, *cfg.pretrain], pre_dir)
                pre_future = pool.submit(_run_composed, pre_cfg)
                pre_future.add_done_callback(pretrained)
            # what does not start from the pre-training runs meanwhile (in a pool; in order here)
            submit(pool, [i for i in range(len(jobs)) if i not in needs])
            if needs:
                pre = pre_future.result()
                submit(pool, needs)
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f.exception() for f in futures if f.done() and f.exception() is not None]
            if failed:  # in a pool; in process a failed run raised where it ran
                raise failed[0]
            metrics = [future.result() for future in futures]
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # one run failed: the queued ones do not start
            raise
    rows = []
    for (fraction, name, lr, seed), out, m in zip(jobs, out_dirs, metrics, strict=True):
        strategy = cfg.strategies[name]
        rows.append(
            {
                "label_fraction": fraction,
                "strategy": name,
                "pretrained": bool(strategy.pretrained),
                "start": strategy.get("start") or ("pre-trained" if strategy.pretrained else "random"),
                "frozen_groups": strategy.get("frozen_groups", ""),
                "forgetting": m.get("forgetting/increase", ""),
                "lr": lr,
                "seed": seed,
                "val_acc": m["val/acc_best"],
                "test_acc": m["test/acc"],
                "test_f1": m["test/f1"],
                "trainable": m["params/trainable"],
                "frozen": m["params/frozen"],
                "train_state_mb": m.get("memory/train_state_mb", ""),
                "seconds": m["time/run_s"],
                "run_dir": str(out.relative_to(study_dir)),
            }
        )

    summary = select_and_summarise(rows, baseline="scratch")
    return write_report(study_dir, cfg, rows, summary, pretrain=pre, seconds=time.time() - started)


def main() -> None:
    launch(app, node=False)


if __name__ == "__main__":
    main()
