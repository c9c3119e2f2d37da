"""Errors the extract stage raises for problems a user can fix (the CLI prints them as one line)."""


class ExtractError(RuntimeError):
    """The extraction cannot proceed (conflicting store, bad option); the message names the fix."""


class Interrupted(RuntimeError):
    """SIGTERM/SIGUSR1 stopped the run after a batch; committed shards stay, rerunning resumes the rest."""
