"""User-facing errors: one clear line, no traceback, non-zero exit."""


class MedtlError(Exception):
    """An error caused by the user's input or environment, with the fix in the message."""

    exit_code = 2


class ConfigError(MedtlError):
    """A job config that cannot be loaded: unknown key, wrong type, bad value."""
