"""Errors raised by lte. Every message says what is wrong and what to do about it."""


class LTEError(ValueError):
    """A problem with the user's model, data, configuration or files."""
