"""The last line of defence: whatever a script raises becomes one line on stderr, and the traceback goes
to a file the line names.

A ``ConfigError`` (a rule, a component or a library refusing a value: ``config/library.py``) and a
``TrainingDiverged`` are already the one line the user needs. Anything else (a file-system error on the
output dir, memory, a bug) is printed as what failed and where, and its full traceback is appended to the
run dir's log (Hydra's ``<job>.log``), else written to ``<run dir>/error.log``, else, when there is no run
dir to be had, to a temporary file. Exit status: 2 for the configuration and the environment (a value,
a path, permissions, memory), 1 for a bug (or a diverged training). ``HYDRA_FULL_ERROR=1`` re-raises, so
the whole traceback shows as Hydra shows it.
"""

from __future__ import annotations

import logging
import os
import sys
import sysconfig
import tempfile
import traceback
from pathlib import Path

from hydra.experimental.callback import Callback

from lightning_modules.core.errors import ConfigError, TrainingDiverged, message_of

ROOT = Path(__file__).resolve().parents[2]  # the checkout, or site-packages: paths are shown relative to it
# pretune's own code, wherever it is installed (a checkout, an editable install, a wheel in site-packages)
OWN = tuple(f"{ROOT / name}{os.sep}" for name in ("lightning_modules", "datamodules", "pretune", "scripts"))
# Libraries and the standard library: any other file is the user's own code (their backbone, callback, test)
LIBRARIES = tuple({sysconfig.get_paths()[k] + os.sep for k in ("stdlib", "platstdlib", "purelib", "platlib")})


def _own(filename: str) -> bool:
    if filename.startswith(OWN):
        return True
    return not filename.startswith(("<", *LIBRARIES)) and not any(
        f"{os.sep}{d}{os.sep}" in filename for d in ("site-packages", "dist-packages", ".venv")
    )


# Errors of the environment or the configuration (exit 2), by class name so that nothing heavy is imported:
# Lightning's MisconfigurationException (a Trainer setting it refuses while running), torch's OutOfMemoryError.
_ENVIRONMENT = ("MisconfigurationException", "OutOfMemoryError")


def warnings_to_log() -> None:
    """Library warnings go to the logging system, i.e. the run's log and Hydra's console (stdout), so that
    stderr holds nothing but what failed. Only in the Hydra app (a test's own warning capture stays as it is)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        logging.captureWarnings(True)


def full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def _os_error(err: BaseException) -> OSError | None:
    """The file-system error behind ``err``, when a library wrapped one (TensorBoard: a name too long)."""
    for _ in range(8):
        if isinstance(err, OSError) and err.strerror:
            return err
        err = err.__cause__ or err.__context__
        if err is None:
            return None
    return None


def exit_code(err: BaseException) -> int:
    if _os_error(err) is not None:
        return 2
    names = {c.__name__ for c in type(err).__mro__}
    if isinstance(err, ConfigError) or isinstance(err, (OSError, MemoryError)) or names & set(_ENVIRONMENT):
        return 2
    if isinstance(err, RuntimeError) and "can't allocate memory" in str(err):  # torch on the CPU
        return 2
    return 1


def _where(err: BaseException) -> str:
    """The innermost frame in pretune's own code (else the innermost at all): ``path:line (function)``."""
    frames = traceback.extract_tb(err.__traceback__)
    own = [f for f in frames if _own(f.filename)]
    frame = (own or frames or [None])[-1]
    if frame is None:
        return "?"
    path = Path(frame.filename)
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return f"{shown}:{frame.lineno} ({frame.name})"


def describe(err: BaseException) -> str:
    """What failed, in one line (without where the traceback went)."""
    if isinstance(err, (ConfigError, TrainingDiverged)):
        return str(err)
    cause = _os_error(err)
    if cause is not None:
        target = f": {cause.filename}" if cause.filename else ""
        return f"{cause.strerror}{target} ({type(cause).__name__} in {_where(err)})"
    kind = "; a bug" if exit_code(err) == 1 else ""  # else memory, or a setting Lightning refused mid-run
    return f"{type(err).__name__}: {message_of(err)} (in {_where(err)}{kind})"


def _hydra_log() -> Path | None:
    """The run dir's log file that Hydra's job logging writes (``<run dir>/<job name>.log``), if any."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_file():
            return Path(handler.baseFilename)
    return None


def write_traceback(err: BaseException, line: str, run_dir: Path | None = None) -> Path:
    """Append ``line`` and the full traceback to the run's log; returns where it went."""
    text = f"{line}\n{''.join(traceback.format_exception(err))}"
    candidates = [_hydra_log(), Path(run_dir) / "error.log" if run_dir is not None else None]
    for path in filter(None, candidates):
        try:
            path.parent.mkdir(exist_ok=True)  # the run dir, not a tree of missing parents
            with open(path, "a") as fh:
                fh.write(text)
            return path
        except OSError:
            continue
    fd, tmp = tempfile.mkstemp(prefix="pretune-error-", suffix=".log")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return Path(tmp)


def report(err: BaseException, run_dir: Path | None = None) -> int:
    """Print ``err`` as one line on stderr (writing its traceback where the line says); returns the exit
    status. Call it in an ``except`` block: under ``HYDRA_FULL_ERROR=1`` it re-raises."""
    if full_error():
        raise err
    line = describe(err)
    if not isinstance(err, (ConfigError, TrainingDiverged)):
        try:
            line += f"; full traceback in {write_traceback(err, line, run_dir)}"
        except OSError as second:  # not even a temporary file: say so, still on one line
            line += f"; no traceback written ({second})"
    print(f"error: {line}", file=sys.stderr, flush=True)
    return exit_code(err)


class RunDirCheck(Callback):
    """Hydra makes the run dir (``hydra.run.dir``, a sweep's ``hydra.sweep.dir``) before the job starts, where
    no job code could catch a failure: try it first, and fail with one line (conf/hydra/default.yaml)."""

    def on_run_start(self, config, **kwargs) -> None:
        self._make("hydra.run.dir", config.hydra.run.dir)

    def on_multirun_start(self, config, **kwargs) -> None:
        self._make("hydra.sweep.dir", config.hydra.sweep.dir)

    @staticmethod
    def _make(key: str, directory: str) -> None:
        try:
            path = Path(directory)
            path.mkdir(parents=True, exist_ok=True)
            if not os.access(path, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied", str(path))
        except OSError as err:
            if full_error():
                raise
            line = f"{key}={directory}: cannot make the run dir: {err.strerror or err}"
            where = write_traceback(err, line)
            print(f"error: {line}; full traceback in {where}", file=sys.stderr, flush=True)
            sys.exit(2)
