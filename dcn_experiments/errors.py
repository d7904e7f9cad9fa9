"""User-facing error types: the CLI prints their message as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (config, data, device). The message says what is wrong and the fix."""


class ConfigError(UserError):
    """A configuration value is invalid or does not fit the other choices."""


class DataError(UserError):
    """A dataset file or folder is missing, corrupt or empty."""
