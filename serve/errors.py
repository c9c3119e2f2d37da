"""Errors of the serve stage that the user can fix: one line that names the fix.

``ServeError`` is a ``ValueError`` (the serve stage's mismatches always were), registered in the CLI's
``USER_ERRORS``: `probecache classify/generate/serve` print it as one ``error:`` line with exit code 2, and the HTTP
endpoint answers it with a 4xx JSON error. No torch or transformers import here, so the CLI can import it cheaply.
"""

from __future__ import annotations


class ServeError(ValueError):
    """A request or a setup that serving refuses; the message says what to change."""


class PromptTooLong(ServeError):
    """A prompt longer than a served probe reads (its store's ``max_tokens``), refused unless truncation was asked
    for: a guardrail that silently reads only part of a prompt can be bypassed by padding the prompt."""

    def __init__(self, message: str, index: int, n_tokens: int, limit: int):
        super().__init__(message)
        self.index, self.n_tokens, self.limit = index, n_tokens, limit
