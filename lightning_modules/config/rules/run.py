"""The run's own keys (``conf/pretrain.yaml``, ``finetune.yaml``: stage, seed, the optimized metric, resuming,
paths, fine-tuning options) and which config groups a run cannot do without."""

from __future__ import annotations

import re

from lightning_modules.config.kinds import (
    METRIC,
    PATH,
    SEED,
    TARGET,
    Choice,
    Custom,
    ExistingPath,
    Flag,
    Rule,
    Section,
    Together,
    invalid,
)
from lightning_modules.core.errors import ConfigError
from lightning_modules.core.locations import hf_offline

HUB_REPO = "null, or a Hugging Face Hub repository <user or org>/<name> (online, with a token)"


def hub_repo(key: str, value):
    """``push_to_hub``: a repository name, and a Hub that can take the push: checked now, since the push happens
    only after training."""
    if value is None:
        return value
    if not isinstance(value, str) or not re.fullmatch(r"[\w.-]+/[\w.-]+", value):
        raise invalid(key, value, HUB_REPO)
    if hf_offline():
        raise ConfigError(
            f"{key}={value}: the Hugging Face Hub is offline (HF_HUB_OFFLINE=1) and the push comes after training;"
            " unset HF_HUB_OFFLINE, or leave push_to_hub=null and upload model/ later (hf upload <repo> <run>/model)"
        )
    from huggingface_hub import get_token  # light (no torch): only when a push is asked for

    if not get_token():
        raise ConfigError(
            f"{key}={value}: no Hugging Face token (hf auth login, or HF_TOKEN), so the push after training would"
            " fail; log in first, or leave push_to_hub=null"
        )
    return value


RULES: dict[str, object] = {
    "stage": Choice("pretrain", "finetune", "evaluate", "predict", "export"),
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
    "finetune.export_model": Flag(),  # model/ when the run ends
    "push_to_hub": Custom(hub_repo, HUB_REPO),
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
        ("push_to_hub", "finetune.export_model"),
        lambda repo, export: repo is None or export,
        "push_to_hub pushes model/, so it needs finetune.export_model=true",
    ),
    Together(
        ("finetune.measure_forgetting", "model.init"),
        lambda measure, init: not measure or init not in ("none", "timm"),
        "measuring forgetting needs model.init to be a pretune pre-training run (its objective's heads)",
    ),
]
