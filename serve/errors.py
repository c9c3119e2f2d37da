"""Errors of the serve stage that the user can fix: one line that names the fix.

``ServeError`` is registered in the CLI's ``user_errors()``: `probecache classify/generate/serve` print it as one
``error:`` line with exit code 2, and the HTTP endpoint answers it with a 4xx JSON error. It is deliberately not a
``ValueError``: a ValueError from numpy, torch or our own code is a bug (a traceback on the command line, 500 over
HTTP), never a message for the user. Checks of Python arguments that only a caller's bug can trip stay ValueError /
TypeError. No torch or transformers import here, so the CLI can import it cheaply.
"""

from __future__ import annotations


class ServeError(Exception):
    """A request or a setup that serving refuses; the message says what to change."""


class PromptTooLong(ServeError):
    """A prompt longer than a served probe reads (its store's ``max_tokens``), refused unless truncation was asked
    for: a guardrail that silently reads only part of a prompt can be bypassed by padding the prompt."""

    def __init__(self, message: str, index: int, n_tokens: int, limit: int):
        super().__init__(message)
        self.index, self.n_tokens, self.limit = index, n_tokens, limit
