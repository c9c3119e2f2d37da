"""Text -> token ids -> padded batches, one way for extraction and serving alike.

A served probe reads the hidden states of exactly the token ids its store was extracted from only if both phases
tokenise the same way; so both call ``encode`` with the store's :class:`Tokenisation` (its ``prompt_format``,
``truncation_side`` and ``max_tokens``, recorded in store.json) and pad with ``pad_batch``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import PROMPT_FORMATS, TRUNCATION_SIDES
from .errors import ModelError


@dataclass(frozen=True)
class Tokenisation:
    """How prompts become token ids: the fields of a store's identity that ``encode`` needs."""

    prompt_format: str = "raw"  # "raw": the text with the tokenizer's special tokens; "chat": the chat template
    truncation_side: str = "right"  # which end of a long prompt is kept: "right" keeps the beginning
    max_tokens: int | None = None  # at most this many tokens are kept; None: no truncation

    def __post_init__(self):
        if self.prompt_format not in PROMPT_FORMATS:
            raise ModelError(f"prompt format {self.prompt_format!r} is not one of {', '.join(PROMPT_FORMATS)} "
                             f"(--prompt-format)")
        if self.truncation_side not in TRUNCATION_SIDES:
            raise ModelError(f"truncation side {self.truncation_side!r} is not one of {', '.join(TRUNCATION_SIDES)} "
                             f"(--truncation-side)")
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int)
                                            or self.max_tokens < 1):
            raise ModelError(f"max_tokens must be a positive integer or None (no truncation), got {self.max_tokens!r}")


def encode(texts: Sequence[str], tokenizer, tokenisation: Tokenisation) -> tuple[list[list[int]], list[int]]:
    """Token ids per text, truncated as ``tokenisation`` says, and each text's untruncated token count."""
    if tokenisation.prompt_format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ModelError("this model's tokenizer has no chat template: use --prompt-format raw")
        # the prompt ends where the assistant's first token would be generated (what serving sees)
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                          add_generation_prompt=True)
            for t in texts
        ]
        # the template already wrote the special tokens (BOS, role markers): adding them again would double BOS
        encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    else:
        encoded = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    lengths = [len(ids) for ids in encoded]
    return truncate(encoded, tokenisation), lengths


def truncate(token_ids: Sequence[Sequence[int]], tokenisation: Tokenisation) -> list[Sequence[int]]:
    """Each prompt cut to ``max_tokens`` on the truncation side (unchanged when ``max_tokens`` is None)."""
    keep = tokenisation.max_tokens
    if keep is None:
        return list(token_ids)
    if tokenisation.truncation_side == "right":
        return [ids[:keep] for ids in token_ids]
    return [ids[-keep:] for ids in token_ids]  # keep >= 1 (checked), so -keep never means "from 0"


def pad_batch(token_ids: Sequence[Sequence[int]], pad_id: int, device: str | torch.device = "cpu",
              side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, padded on ``side`` to the batch's own longest prompt.

    Extraction and classification pad on the right: with the mask, each real token keeps the position ids it has
    alone, and causal attention never lets it see the padding after it. Generation pads on the left (new tokens
    follow the prompt); transformers then derives position ids from the mask."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    longest = max(len(ids) for ids in token_ids)
    ids = torch.full((len(token_ids), longest), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(token_ids), longest), dtype=torch.long)  # (B, T)
    for b, seq in enumerate(token_ids):
        span = slice(0, len(seq)) if side == "right" else slice(longest - len(seq), longest)
        ids[b, span] = torch.tensor(list(seq), dtype=torch.long)
        mask[b, span] = 1
    return ids.to(device), mask.to(device)


def pad_token_id(tokenizer, config=None) -> int:
    """The id padding uses. Any id works (padding is masked and never stored); prefer the tokenizer's pad, then its
    eos, then the model config's (``config``, for a model used without a tokenizer), else 0."""
    for holder in (tokenizer, config):
        if holder is None:
            continue
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(holder, attr, None)
            if isinstance(value, (list, tuple)):  # some configs list several eos ids
                value = value[0] if value else None
            if value is not None:
                return int(value)
    return 0
