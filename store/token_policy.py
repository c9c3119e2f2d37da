"""Which tokens of each prompt a store keeps (``extract --tokens``), and the one rule that picks them.

    all       every real token (the default)
    last      the last real token only
    last-N    the last N real tokens (all of them when the prompt is shorter)
    every-K   every K-th token counted back from the last: positions n-1, n-1-K, n-1-2K, ... (the last is kept)

Counting from the end means every policy keeps each prompt's last token, so the ``last`` pooled tier and a
probe's last-token readout mean the same thing in every store. The per-example ``mean`` array is always the mean
over every token the model saw, whatever the policy (it is pooled before tokens are dropped).

:func:`keep_mask` is the rule, written once on a (B, T) mask of real tokens: extraction picks the kept positions
with it, and serving masks a run's tokens with it, so a probe trained on kept tokens reads the same ones in the
model's own forward pass (left or right padding alike).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import StoreError

if TYPE_CHECKING:  # torch only where masks are built: store.json checks (header.py) parse policies without it
    import torch

ALL = "all"
USAGE = "use all, last, last-N (e.g. last-32) or every-K (e.g. every-4)"
PATTERN = re.compile(r"^(all|last)$|^(last|every)-([1-9][0-9]*)$")


class TokenPolicyError(StoreError):
    """A token policy that does not parse; the message shows the grammar."""


@dataclass(frozen=True)
class TokenPolicy:
    kind: str  # "all" | "last" | "every"
    n: int = 1  # last-N: how many; every-K: the stride

    @property
    def name(self) -> str:
        if self.kind == ALL:
            return ALL
        return "last" if self.kind == "last" and self.n == 1 else f"{self.kind}-{self.n}"

    @property
    def keeps_all(self) -> bool:
        return self.kind == ALL

    def keep_mask(self, valid: torch.Tensor) -> torch.Tensor:
        """(B, T) bool mask of real tokens -> (B, T) bool mask of the tokens this policy keeps."""
        if self.keeps_all:
            return valid
        # how many real tokens come after each position: 0 at the last real token of its row
        from_end = valid.flip(1).long().cumsum(dim=1).flip(1) - 1  # (B, T)
        if self.kind == "last":
            return valid & (from_end < self.n)
        return valid & (from_end % self.n == 0)

    def positions(self, n_tokens: int) -> torch.Tensor:
        """The kept positions of a prompt of ``n_tokens`` real tokens, ascending: (n_kept,) int64."""
        import torch

        return torch.nonzero(self.keep_mask(torch.ones(1, n_tokens, dtype=torch.bool))[0]).flatten()

    def count(self, n_tokens: int) -> int:
        """How many of ``n_tokens`` real tokens the policy keeps (at least 1 for a non-empty prompt)."""
        if self.keeps_all:
            return n_tokens
        if self.kind == "last":
            return min(self.n, n_tokens)
        return -(-n_tokens // self.n)


def parse_token_policy(text: str | None) -> TokenPolicy:
    """``all`` | ``last`` | ``last-N`` | ``every-K`` (None = all) -> a TokenPolicy; TokenPolicyError otherwise."""
    spec = (text or ALL).strip().lower()
    match = PATTERN.match(spec)
    if not match:
        raise TokenPolicyError(f"token policy {text!r} is not one of the forms: {USAGE}")
    if match.group(1):
        return TokenPolicy(match.group(1))
    kind, n = match.group(2), int(match.group(3))
    return TokenPolicy(ALL) if kind == "every" and n == 1 else TokenPolicy(kind, n)  # one name per token set


def store_token_policy(info: dict) -> TokenPolicy:
    """The token policy a store was extracted with (stores from before policies keep every token)."""
    return parse_token_policy(info.get("capture", {}).get("tokens"))
