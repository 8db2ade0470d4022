"""What the optional extras bring (``pip install "pretune[<extra>]"``, pyproject's optional-dependencies), and the
one line when a run needs one that is not installed. The default install runs images end to end (the main job);
each extra adds what only some users need. Checked with ``find_spec``: nothing is imported here."""

from __future__ import annotations

import importlib.util

from lightning_modules.core.errors import ConfigError

# module -> the extra that installs it
EXTRAS = {
    "optuna": "sweeps",
    "hydra_plugins.hydra_optuna_sweeper": "sweeps",
    "sqlalchemy": "sweeps",
    "submitit": "slurm",
    "hydra_plugins.hydra_submitit_launcher": "slurm",
    "wandb": "wandb",
    "transformers": "text",
    "tokenizers": "text",
    "litdata": "shards",
    "onnx": "export",
    "onnxscript": "export",
    "onnxruntime": "export",
    "lightly": "ssl",
    "peft": "lora",
}


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is not there (hydra_plugins.<plugin>)
        return False


def require(what: str, *modules: str) -> None:
    """Refuse in one line when a module of an extra that ``what`` needs is not installed, naming the command that
    installs it."""
    missing = [m for m in modules if not installed(m)]
    if missing:
        extra = EXTRAS[missing[0]]
        raise ConfigError(f'{what} needs {missing[0]}, which is not installed: pip install "pretune[{extra}]"')
