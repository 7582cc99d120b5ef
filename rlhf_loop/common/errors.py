"""Errors a user can fix. The CLI prints them as one line and exits non-zero; nothing already written is touched."""


class UserError(Exception):
    """Bad input: the message names what is wrong and how to fix it."""


class ConfigError(UserError):
    """A config file or override that does not fit the schema."""
