"""The run's own keys (``conf/pretrain.yaml``, ``finetune.yaml``: stage, seed, the optimized metric, resuming,
paths, fine-tuning options) and which config groups a run cannot do without."""

from __future__ import annotations

from lightning_modules.config.kinds import (
    METRIC,
    PATH,
    SEED,
    TARGET,
    Choice,
    ExistingPath,
    Flag,
    Rule,
    Section,
    Together,
)

RULES: dict[str, object] = {
    "stage": Choice("pretrain", "finetune", "evaluate"),
    "seed": SEED,
    "optimized_metric": METRIC,  # that the objective logs it is checked once the objective is built
    "optimized_mode": Choice("min", "max"),
    "ckpt_path": ExistingPath("any", nullable=True, words=("last",)),  # a file, a run dir, or last
    "float32_matmul_precision": Choice("auto", "highest", "high", "medium"),
    "paths.root_dir": PATH,
    "paths.log_dir": PATH,
    "paths.output_dir": PATH,  # made when the run starts; a failure there is one line too
    "finetune": Section(),
    "finetune.l2_sp": Rule(float, low=0),
    "finetune.measure_forgetting": Flag(),
    "finetune.cache_features": Flag(),  # a backbone frozen throughout: its features computed once
    "**._target_": TARGET,  # callbacks, loggers, strategies: Hydra reports one it cannot import
}

PASSED_THROUGH = {"hydra": "Hydra"}

# The config groups a run cannot do without (``~trainer`` on the command line removes one).
REQUIRED_GROUPS = {
    "pretrain": ("datamodule", "model", "objective", "optimizer", "scheduler", "trainer"),
    "finetune": ("datamodule", "model", "objective", "optimizer", "scheduler", "trainer", "freeze"),
    "evaluate": ("datamodule", "model"),
}

TOGETHER = [
    Together(
        ("finetune.measure_forgetting", "model.init"),
        lambda measure, init: not measure or init not in ("none", "timm"),
        "measuring forgetting needs model.init to be a pretune pre-training run (its objective's heads)",
    ),
]
