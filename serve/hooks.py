"""Forward hooks that see each hidden state of a decoder as ``output_hidden_states`` would return it.

The extract stage stores ``model.base_model(..., output_hidden_states=True).hidden_states``: L+1 tensors
(B, T, d). In transformers 5 that tuple is recorded by hooks of its own (``utils/output_capturing.py``):

    index 0        the *input* of the first decoder layer (``args[0]``): the embedding output for Llama
    index i        the output of decoder layer i-1, for i = 1..L-1 (a Llama layer returns a plain tensor in
                   transformers 5; older versions returned a tuple whose first item is the state)
    index L        ``last_hidden_state``: the output of the final norm, which *replaces* the raw output of
                   the last layer (``tie_last_hidden_states``)

:func:`register_state_hooks` reproduces exactly that with our own hooks: a forward *pre*-hook on layer 0 (rather
than a hook on ``embed_tokens``, so a model that scales or otherwise transforms embeddings before its first
layer still matches index 0), forward hooks on layers 0..L-2, and a forward hook on the final norm. The raw
output of the last layer is never observed, as in ``output_hidden_states``. A test checks the equality index by
index.

Hooks only observe (they return None); the callback decides what to keep. During generation they fire again at
every decoding step with T = 1: the caller tells the passes apart (``probed.py`` keeps the first call per index).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import ServeError

StateCallback = Callable[[int, torch.Tensor], None]  # (hidden_states index, hidden (B, T, d))


def decoder_parts(model: nn.Module) -> tuple[nn.ModuleList, nn.Module]:
    """The decoder layers and the final norm of a causal LM (Llama family: ``model.model.layers`` / ``.norm``)."""
    base = getattr(model, "base_model", model)
    layers, norm = getattr(base, "layers", None), getattr(base, "norm", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0 or not isinstance(norm, nn.Module):
        raise ServeError(f"{type(model).__name__} is not a Llama-family decoder (its base model has no `.layers` "
                         f"and `.norm`): serving hooks support LlamaForCausalLM-like models")
    return layers, norm


def n_hidden_states(model: nn.Module) -> int:
    """L + 1: the number of tensors ``output_hidden_states`` returns."""
    return len(decoder_parts(model)[0]) + 1


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def register_state_hooks(model: nn.Module, callback: StateCallback,
                         indices: Iterable[int] | None = None) -> list[RemovableHandle]:
    """Call ``callback(index, hidden)`` for every hidden-state index in ``indices`` (default: all L+1) during each
    forward pass of ``model``; returns the handles (``handle.remove()`` each when done).

    Only the requested indices get a hook, so a probe that reads a few layers costs a few Python calls per pass.
    """
    layers, norm = decoder_parts(model)
    n = len(layers) + 1
    wanted = set(range(n)) if indices is None else {int(i) for i in indices}
    if any(not 0 <= i < n for i in wanted):
        raise ValueError(f"hidden-state indices {sorted(wanted)} out of range 0..{n - 1}")
    handles: list[RemovableHandle] = []
    if 0 in wanted:
        def embed_hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            callback(0, hidden)

        handles.append(layers[0].register_forward_pre_hook(embed_hook, with_kwargs=True))
    for i in range(1, n - 1):
        if i in wanted:
            def layer_hook(module, args, output, index=i):
                callback(index, _first(output))

            handles.append(layers[i - 1].register_forward_hook(layer_hook))
    if n - 1 in wanted:
        handles.append(norm.register_forward_hook(lambda module, args, output: callback(n - 1, _first(output))))
    return handles


def remove_hooks(handles: Iterable[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
