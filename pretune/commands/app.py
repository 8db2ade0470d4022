"""What the Hydra subcommands share before Hydra starts: the shipped configs' location, and the one-line refusals
Hydra would otherwise answer with a traceback or not at all (a ``--config-dir`` that does not exist or holds no
YAML, a sweeper or launcher whose extra is not installed)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from lightning_modules.core.errors import ConfigError
from lightning_modules.core.extras import require
from lightning_modules.core.locations import CONFIG_PATH
from lightning_modules.runtime.cli import this_node

__all__ = ["CONFIG_PATH", "launch"]

# command-line choices -> (what the line names, the modules its extra installs)
_SWEEPER = ("hydra_plugins.hydra_optuna_sweeper", "optuna", "sqlalchemy")
_LAUNCHER = ("hydra_plugins.hydra_submitit_launcher", "submitit")


def _config_dirs(argv: list[str]) -> list[str]:
    """The ``--config-dir``/``-cd`` values on the command line, in both spellings (``--config-dir x``, ``=x``)."""
    found = []
    for i, arg in enumerate(argv):
        for flag in ("--config-dir", "-cd"):
            if arg == flag and i + 1 < len(argv):
                found.append(argv[i + 1])
            elif arg.startswith(flag + "="):
                found.append(arg.partition("=")[2])
    return found


def check_command_line(argv: list[str]) -> None:
    """The user's config folder exists and holds configs; the extras a sweeper or launcher choice needs are
    installed (Hydra itself would say ``Could not load 'hydra/sweeper/optuna'``, without the fix)."""
    for spelled in _config_dirs(argv):
        path = Path(spelled).expanduser()
        if not path.is_dir():
            raise ConfigError(f"--config-dir={spelled}: no such directory")
        if not any(path.rglob("*.yaml")) and not any(path.rglob("*.yml")):
            raise ConfigError(f"--config-dir={spelled}: holds no .yaml config (one folder per group, e.g. experiment/)")
    overrides = [a.lstrip("+~") for a in argv if "=" in a and not a.startswith("-")]
    for override in overrides:
        key, _, choice = override.partition("=")
        if key == "hparams_search" and choice not in ("null", ""):
            require(f"hparams_search={choice} (the Optuna sweeper)", *_SWEEPER)
        elif key == "hydra/sweeper" and choice == "optuna":
            require("hydra/sweeper=optuna", *_SWEEPER)
        elif key == "hydra/launcher" and (choice == "slurm" or choice.startswith("submitit")):
            require(f"hydra/launcher={choice}", *_LAUNCHER)


def launch(app: Callable[[], object], node: bool = True) -> None:
    """Run a Hydra application on ``sys.argv``, after the checks Hydra does not make. ``node``: a run started by
    hand on several nodes gets its own log on each (``runtime/cli.this_node``)."""
    try:
        check_command_line(sys.argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if node:
        sys.argv = this_node(sys.argv)
    app()
