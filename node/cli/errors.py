"""The CLI's one error type: input or environment trouble shown without a traceback (exit 2)."""


class UserError(Exception):
    """An error caused by input or environment, shown to the user without a traceback."""
