#!/usr/bin/env python
"""The main job: what did pre-training buy? Pre-train once, then fine-tune from scratch, from the
pre-trained backbone under several strategies and from ImageNet weights, at low label fractions, over
several seeds, each strategy at its own best learning rate (chosen on validation), and write a report.
The same study on text (``conf/transfer_study_text.yaml``): MLM pre-training on the embedded corpus, then the
embedded labeled task from scratch, from that backbone and from MiniLM.

    python scripts/transfer_study.py                 # what `make run` runs
    python scripts/transfer_study.py 'seeds=[0,1,2,3,4]' 'label_fractions=[0.02,0.1]'
    python scripts/transfer_study.py --config-name transfer_study_text   # what `make run-text` runs
"""

import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lightning_modules.config.errors import ConfigError  # noqa: E402


def _run_stage(stage: str, overrides: list[str], out_dir: Path) -> dict:
    from hydra import compose

    from lightning_modules.config.check import check_config
    from lightning_modules.runtime.run import run

    cfg = compose(config_name=stage, overrides=[*overrides, f"paths.output_dir={out_dir}"])
    check_config(cfg)
    # A DDP/FSDP rank re-runs its Hydra job: here that would be the whole study, once per rank.
    if "parallel." in str(OmegaConf.select(cfg, "trainer.strategy._target_", default="")):
        raise ConfigError(
            "trainer=ddp/fsdp is not supported inside the transfer study (its stages run in one process);"
            " run scripts/pretrain.py and scripts/finetune.py with trainer=ddp instead"
        )
    return run(cfg)


@hydra.main(version_base="1.3", config_path="../conf", config_name="transfer_study")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    study_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        report = study(cfg, study_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"\nReport: {report}")


def study(cfg: DictConfig, study_dir: Path) -> Path:
    import logging
    import warnings

    import pytorch_lightning  # noqa: F401  (imported first: it sets its loggers to INFO on import)

    from lightning_modules.reports.transfer import select_and_summarise, write_report

    # Dozens of runs in one process: keep the console to one line per run.
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    started = time.time()
    pre_dir = study_dir / "pretrain"
    pre = None
    # Pre-train only when a strategy starts from this study's backbone (init: model strategies bring their own),
    # or takes its tokenizer (tokenizer: pretrained).
    uses = lambda s: (s.pretrained and s.get("init") != "model") or s.get("tokenizer") == "pretrained"  # noqa: E731
    if any(uses(s) for s in cfg.strategies.values()):
        print(f"pre-training ({' '.join(cfg.pretrain)}) ...", flush=True)
        pre = _run_stage("pretrain", [*cfg.common, *cfg.pretrain], pre_dir)
        print(f"  done in {pre['time/run_s']:.0f}s, val/loss {pre['val/loss']:.3f}", flush=True)

    jobs = [
        (fraction, name, lr, seed)
        for fraction in cfg.label_fractions
        for name, strategy in cfg.strategies.items()
        if fraction in strategy.get("label_fractions", cfg.label_fractions)
        for lr in strategy.lrs
        for seed in cfg.seeds
    ]
    rows = []
    for i, (fraction, name, lr, seed) in enumerate(jobs, 1):
        strategy = cfg.strategies[name]
        # init: model keeps the model config's own model.init (weights from elsewhere, e.g. ImageNet's)
        if strategy.get("init") == "model":
            init = []
        else:
            init = [f"model.init={pre_dir}" if strategy.pretrained else "model.init=none"]
        if strategy.get("tokenizer") == "pretrained":  # random weights on the pre-trained backbone's vocabulary
            init.append(f"model.tokenizer={pre_dir}")
        overrides = [
            *cfg.common,
            *cfg.finetune,
            *strategy.overrides,
            *init,
            f"datamodule.label_fraction={fraction}",
            f"optimizer.lr={lr}",
            f"seed={seed}",
        ]
        out = study_dir / "finetune" / f"labels{fraction:g}_{name}_lr{lr:g}_seed{seed}"
        m = _run_stage("finetune", overrides, out)
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
                "seconds": m["time/run_s"],
                "run_dir": str(out.relative_to(study_dir)),
            }
        )
        print(
            f"[{i:>2}/{len(jobs)}] labels={fraction:<5g} {name:<14} lr={lr:<7g} seed={seed}:"
            f" val/acc {m['val/acc_best']:.3f}  test/acc {m['test/acc']:.3f}  ({m['time/run_s']:.1f}s)",
            flush=True,
        )

    summary = select_and_summarise(rows, baseline="scratch")
    return write_report(study_dir, cfg, rows, summary, pretrain=pre, seconds=time.time() - started)


if __name__ == "__main__":
    main()
