"""Errors the store raises for problems a user can fix (the CLI prints them as one line)."""


class StoreError(RuntimeError):
    """A store is missing, malformed, or incompatible with the request; the message names the fix."""
