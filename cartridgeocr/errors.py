"""User-facing errors: the CLI prints them as one line, never as a traceback."""


class ConfigError(ValueError):
    """A config value that cannot work (names the key and the problem)."""
