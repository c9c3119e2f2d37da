"""Errors of the lm stage that a user can fix (the CLI prints them as one line). No torch import here."""


class ModelError(RuntimeError):
    """--model / --dtype / --device / the tokenisation cannot be honoured; the message names the fix."""
