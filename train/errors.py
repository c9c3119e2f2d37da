"""Errors of the train stage that the user can fix: one line that names the fix.

``TrainError`` covers bad options (``--lr 0``, an unknown ``--probe``, a ``--device`` this machine lacks), a store
that lacks what a probe needs (labels, a split, logits, raw text), a run folder that is missing or damaged, and a
run and a store that do not belong together. The CLI lists it in ``user_errors()``: one ``error:`` line, exit 2.

It is deliberately not a ``ValueError``: a ValueError from numpy, torch or our own code is a bug and must reach
the user as a traceback, not be mistaken for a message meant for them. Checks of a function's arguments that only
a caller's bug can trip (array shapes, internal invariants) stay ``ValueError`` / assertions. No imports here, so
the CLI can match it cheaply.
"""

from __future__ import annotations


class TrainError(Exception):
    """A training, evaluation or report request that the train stage refuses; the message says what to change."""

