"""The extract stage's configuration: one frozen dataclass whose fields become CLI options."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from probecache.lm import DEFAULT_MODEL, PROMPT_FORMATS, TRUNCATION_SIDES  # plain constants: no torch import

if TYPE_CHECKING:  # store.tiers imports numpy: the CLI imports this module for its defaults and must stay light
    from probecache.store.tiers import Tier
    from probecache.store.token_policy import TokenPolicy

from .datasets import DEFAULT_DATASET

DEFAULT_ROOT = "stores"


def default_root() -> str:
    return os.environ.get("PROBECACHE_ROOT") or DEFAULT_ROOT


@dataclass(frozen=True)
class ExtractConfig:
    # what to extract
    dataset: str = DEFAULT_DATASET
    splits: tuple[str, ...] | None = None  # None = every split the source has
    limit: int | None = None  # cap on examples in the store, spread over splits in proportion
    data_dir: str | None = None  # for file-backed datasets; else $PROBECACHE_DATA_DIR
    text_col: str | None = None
    label_col: str | None = None
    id_col: str | None = None
    strict: bool = False  # bad rows are an error instead of being excluded and reported
    validation_fraction: float | None = None  # carved from train where a source has none; None = 0.1
    # (0.15 for the 200-example toxigen)
    seed: int = 0  # carving and --limit sampling
    # how
    model: str = DEFAULT_MODEL
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32
    device: str = "auto"  # auto | cpu | cuda[:N]
    prompt_format: str = "raw"  # raw text, or the model's chat template with a generation prompt
    max_tokens: int = 512
    truncation_side: str = "right"  # right keeps the beginning of long texts
    logits: bool = False  # also keep next-token logits at the last prompt position (MULI baseline)
    store_text: bool = False  # opt in: raw text in the manifest (stores may hold sensitive prompts)
    # opt in: each kept token's id beside its hidden states (per-token analysis outside probecache); opt-in for
    # the same reason as store_text: ids decode back to the text with the tokenizer
    store_token_ids: bool = False
    # which states to keep (capture subsets): --layers in the one layer grammar (store/layers.py; None = every layer)
    # and --tokens (store/token_policy.py: all | last | last-N | every-K); both change the store id when not "all"
    layers: str | None = None
    tokens: str = "all"
    # store each distinct prompt prefix (a chat template's system prompt) once per shard, examples referencing it
    # (store/prefixes.py); changes the store id, never a value read back
    share_prefixes: bool = False
    # how hidden values are stored (store/tiers.py): lossless | mantissa-K | fp8-e4m3 | fp8-e5m2 | int8
    tier: str = "lossless"
    mantissa_bits: int | None = None  # alias of tier="mantissa-K" (the option that came first)
    # where and how fast (not part of the store's identity, except shard_size which shapes the layout)
    root: str = DEFAULT_ROOT
    shard_size: int = 512  # examples per shard: the unit of work and of commit
    batch_tokens: int = 4096  # padded tokens per forward batch
    max_batch_size: int = 64
    # threads that compress each zarr shard's inner chunks (blosc releases the GIL). None = auto: 0 on a CPU
    # device, where the forward pass already uses every core, else the host's cores minus one (a GPU host's
    # cores are otherwise idle, and compression must keep up with the GPU: docs/BENCHMARKS.md)
    encode_threads: int | None = None
    progress: bool = True

    def validate(self) -> None:
        from .errors import ExtractError

        if self.prompt_format not in PROMPT_FORMATS:
            raise ExtractError(f"--prompt-format {self.prompt_format!r} is not one of {', '.join(PROMPT_FORMATS)}")
        if self.truncation_side not in TRUNCATION_SIDES:
            raise ExtractError(f"--truncation-side must be one of {', '.join(TRUNCATION_SIDES)}")
        for name in ("max_tokens", "shard_size", "batch_tokens", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ExtractError(f"--{name.replace('_', '-')} must be a positive integer")
        if self.encode_threads is not None and self.encode_threads < 0:
            raise ExtractError("--encode-threads must be 0 (compress on the writer thread) or more")
        if self.limit is not None and self.limit < 1:
            raise ExtractError("--limit must be a positive integer")
        if self.mantissa_bits is not None and not 0 <= self.mantissa_bits <= 6:
            raise ExtractError("--mantissa-bits must be in 0..6 (omit it for lossless storage)")
        self.value_tier()
        if self.share_prefixes and not self.token_policy().keeps_all:
            raise ExtractError(f"--share-prefixes shares the states of a prompt's first tokens, and --tokens "
                               f"{self.tokens} drops them: use --tokens all, or drop --share-prefixes")
        if self.validation_fraction is not None and not 0.0 < self.validation_fraction < 0.5:
            raise ExtractError("--validation-fraction must be in (0, 0.5)")

    def token_policy(self) -> TokenPolicy:
        """The tokens to keep of each prompt (--tokens)."""
        from probecache.store.token_policy import TokenPolicyError, parse_token_policy

        from .errors import ExtractError

        try:
            return parse_token_policy(self.tokens)
        except TokenPolicyError as e:
            raise ExtractError(f"--tokens: {e}") from None

    def stored_layers(self, n_layers: int) -> list[int]:
        """The model layers to keep (--layers) as ascending indices into the model's ``n_layers`` (L+1) layers."""
        from probecache.store.layers import LayerSelectionError, select_layers

        from .errors import ExtractError

        try:
            return sorted(set(select_layers(self.layers, n_layers)))
        except LayerSelectionError as e:
            raise ExtractError(f"--{e}") from None

    def value_tier(self) -> Tier:
        """The tier to store values in: ``tier``, or mantissa-K from ``--mantissa-bits K`` (its alias)."""
        from probecache.store.tiers import TierError, parse_tier

        from .errors import ExtractError

        try:
            tier = parse_tier(self.tier)
        except TierError as e:
            raise ExtractError(f"--tier: {e}") from None
        if self.mantissa_bits is None:
            return tier
        if tier.name not in ("lossless", f"mantissa-{self.mantissa_bits}"):
            raise ExtractError(f"--mantissa-bits {self.mantissa_bits} is --tier mantissa-{self.mantissa_bits}: "
                               f"drop one of it and --tier {tier.name}")
        return parse_tier(f"mantissa-{self.mantissa_bits}")
