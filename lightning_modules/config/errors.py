"""The errors a user can act on: the scripts print their message on one line, no traceback."""


class ConfigError(ValueError):
    """A bad value the user can fix: the message names the key, the value and what is allowed."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""
