"""The one layer-selection grammar: every reader, loader and command that takes "which layers" parses it here.

A store holds L+1 layers: 0 is the embedding output, i the output of transformer block i, and L the last block's
output after the model's final norm (what HF transformers' ``output_hidden_states`` returns). A selection is:

    None or "all"         every layer, in order
    7, -1                 one layer (negative counts from the end: -1 = L)
    slice(0, 5)           a Python slice of the layer axis
    [0, 15, 30]           a list, in the order given (a tensor's layer axis follows it)
    "0-4,20,-1"           text (the CLI's --layers): comma-separated layers and inclusive ranges, sorted and
                          de-duplicated; "20--1" is 20..L (a leading '-' is a sign, the first '-' after it a range)

Reads slice contiguous runs of the selected layers (:func:`layer_runs`): zarr integer-list selection is ~40x
slower than a slice.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import StoreError

Layers = int | slice | Sequence[int] | str | None

USAGE = "use e.g. 0-4,10,-1 (0 = embedding output, -1 = last layer) or all"


class LayerSelectionError(StoreError):
    """A layer selection that does not parse or does not fit the store; the message shows the grammar."""


def select_layers(layers: Layers, n_layers: int) -> list[int]:
    """A layer selection (see the module docstring) as a non-empty list of indices in 0..n_layers-1."""
    if layers is None or (isinstance(layers, str) and layers.strip().lower() == "all"):
        return list(range(n_layers))
    if isinstance(layers, str):
        return _parse_text(layers, n_layers)
    if isinstance(layers, slice):
        out = list(range(n_layers))[layers]
    else:
        values = [layers] if isinstance(layers, int) else list(layers)
        if any(isinstance(v, bool) or not isinstance(v, int) and not hasattr(v, "__index__") for v in values):
            raise LayerSelectionError(f"layers {layers!r}: layers are integers; {USAGE}")
        out = [_index(int(v), n_layers, layers) for v in values]
    if not out:
        raise LayerSelectionError(f"layers {layers!r} selects no layer: pass None (or 'all') for every layer")
    return out


def layer_runs(layers: Sequence[int]) -> list[slice]:
    """Consecutive ascending runs of a layer list as slices, in order: [0, 2, 3, 1] -> [0:1, 2:4, 1:2]."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([layer, layer + 1])
    return [slice(a, b) for a, b in runs]


def _index(value: int, n_layers: int, spec: object) -> int:
    index = value + n_layers if value < 0 else value
    if not 0 <= index < n_layers:
        raise LayerSelectionError(f"layers {spec!r}: layer {value} is out of range (this store has layers "
                                  f"0..{n_layers - 1}, or -{n_layers}..-1 from the end)")
    return index


def _parse_text(spec: str, n_layers: int) -> list[int]:
    out: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        split_at = part.find("-", 1)  # a leading '-' is a sign, not a range
        ends = (part[:split_at], part[split_at + 1:]) if split_at > 0 else (part,)
        try:
            values = [int(end) for end in ends]
        except ValueError:
            raise LayerSelectionError(f"layers {spec!r} is not a layer list: {USAGE}") from None
        lo, hi = (_index(v, n_layers, spec) for v in (values[0], values[-1]))
        if lo > hi:
            raise LayerSelectionError(f"layers {spec!r}: range {part} is empty; {USAGE}")
        out.extend(range(lo, hi + 1))
    return sorted(dict.fromkeys(out))


def format_layers(layers: Sequence[int]) -> str:
    """Ascending layer indices in the text grammar, ranges joined: [0, 1, 2, 3, 4, 20, 30] -> "0-4,20,30"."""
    return ",".join(str(r.start) if r.stop - r.start == 1 else f"{r.start}-{r.stop - 1}" for r in layer_runs(layers))
