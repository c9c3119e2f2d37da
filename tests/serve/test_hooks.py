"""serve/hooks.py: what the hooks see is, index by index, what ``output_hidden_states`` returns (and what the
extractor stores), for every dtype and padding side; hooks come and go without a trace."""

from __future__ import annotations

import pytest
import torch
from probecache.lm.models import load_model, resolve_model
from probecache.serve.errors import ServeError
from probecache.serve.hooks import decoder_parts, n_hidden_states, register_state_hooks, remove_hooks

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def loaded(request, tiny_model):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[request.param]
    return load_model(resolve_model(str(tiny_model)), dtype, "cpu")


def batch(side: str):
    """Two prompts of different lengths, padded on ``side``: (2, 9) ids and mask."""
    ids = torch.tensor([[5, 17, 33, 40, 41, 42, 60, 61, 62], [7, 8, 9, 10, 0, 0, 0, 0, 0]])
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5])
    if side == "left":
        ids[1], mask[1] = ids[1].roll(5), mask[1].roll(5)
    return ids, mask


@pytest.mark.parametrize("side", ["right", "left"])
def test_hooks_see_exactly_output_hidden_states(loaded, side):
    model, _ = loaded
    ids, mask = batch(side)
    seen: dict[int, torch.Tensor] = {}
    handles = register_state_hooks(model, lambda i, h: seen.setdefault(i, h.clone()))
    try:
        with torch.no_grad():
            out = model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    finally:
        remove_hooks(handles)
    states = out.hidden_states
    assert len(states) == n_hidden_states(model) == 4 and sorted(seen) == [0, 1, 2, 3]
    for i, state in enumerate(states):
        assert seen[i].dtype == state.dtype and torch.equal(seen[i], state), f"hidden state {i} differs"
    assert torch.equal(seen[3], out.last_hidden_state)  # the final norm's output, not the last layer's raw one


def test_hooks_only_where_asked_and_removed(loaded):
    model, _ = loaded
    layers, norm = decoder_parts(model)
    parts = [*layers, norm]

    def counts() -> list[int]:  # transformers installs hooks of its own once output_hidden_states was used
        return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in parts]

    before = counts()
    seen = []
    handles = register_state_hooks(model, lambda i, h: seen.append(i), indices=[2])
    assert len(handles) == 1 and [a - b for a, b in zip(counts(), before, strict=True)] == [0, 1, 0, 0]
    with torch.no_grad():
        model.base_model(input_ids=torch.tensor([[1, 2, 3]]))
    remove_hooks(handles)
    with torch.no_grad():
        model.base_model(input_ids=torch.tensor([[1, 2, 3]]))
    assert seen == [2] and counts() == before
    with pytest.raises(ValueError, match="out of range"):
        register_state_hooks(model, lambda i, h: None, indices=[4])


def test_non_llama_models_are_refused():
    with pytest.raises(ServeError, match="not a Llama-family decoder"):
        decoder_parts(torch.nn.Linear(2, 2))
