"""The one exception type for bad user input."""


class UserError(ValueError):
    """Bad input from a user: the CLI prints ``error: <message>`` and exits with status 2."""
