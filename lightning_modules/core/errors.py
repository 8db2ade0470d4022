"""The errors a user can act on, and how a message shows a value: the scripts print one line, no traceback."""


class ConfigError(ValueError):
    """A bad value the user can fix: the message names the key, the value and what is allowed."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


class Requeued(SystemExit):
    """A SLURM job saved its checkpoint and was requeued (``callbacks/preemption.py``): the run stops here and the
    requeued job resumes it. Not a failure: no ``metrics.json``, and the process exits with status 3 (an exit, which
    Hydra and submitit let through: a submitit job records no result, so its launcher waits for the requeued one)."""

    def __init__(self):
        super().__init__(3)


def show(value) -> str:
    """A value as it would be typed on the command line: strings quoted, null, true/false, nan."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return repr(value) if isinstance(value, str) else str(value)


def message_of(err: BaseException, limit: int = 400) -> str:
    """The exception's message on one line (its type when it has none), without a final period."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text.rstrip(".")
