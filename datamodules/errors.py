"""The one exception type for a user mistake: the scripts print its message on one line and exit 2."""


class ConfigError(ValueError):
    """A bad value the user can fix: the message names the key, the value and what is allowed."""
