"""One forward pass over a right-padded batch, returning every hidden state of every position.

Right padding with an attention mask keeps each real token's position ids equal to those of the example
run alone (left padding without explicit position_ids moved values 12x more in a test); causal attention
means real tokens never attend to the padding that follows them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from probecache.lm.tokens import pad_batch


@dataclass
class CapturedBatch:
    hidden: tuple[torch.Tensor, ...]  # L' CPU tensors (B, T, d) (the kept layers), model dtype; positions >=
    # lengths[b] are padding
    mean: torch.Tensor  # (B, L', d) float32 mean over each example's real tokens
    lengths: list[int]  # real tokens per example
    logits: torch.Tensor | None  # (B, V) on CPU, next-token logits at each example's last real token


@torch.inference_mode()
def capture(model, token_ids: list[list[int]], pad_id: int, with_logits: bool,
            layers: list[int] | None = None) -> CapturedBatch:
    """Run the base model (no LM head over every position) and gather hidden states, means (+ logits) of
    ``layers`` (indices into the L+1 hidden states; None = all): the others are never pooled or copied."""
    device = next(model.parameters()).device
    ids, mask = pad_batch(token_ids, pad_id, str(device))  # (B, T)
    out = model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    states = out.hidden_states  # tuple of L+1 tensors (B, T, d)
    logit_input = states[-1]  # the final-norm output, whether or not it is kept
    if layers is not None:
        states = tuple(states[i] for i in layers)  # L' tensors (B, T, d)
    lengths = torch.tensor([len(seq) for seq in token_ids], device=device)
    # Pooled means here, on the model's device and threads: masking by 0/1 is exact in any dtype, and the
    # sum accumulates in fp32, so the mean is that of the stored values.
    keep = mask.unsqueeze(-1).to(states[0].dtype)  # (B, T, 1)
    mean = torch.stack([(h * keep).sum(dim=1, dtype=torch.float32) for h in states], dim=1)  # (B, L', d)
    mean = (mean / lengths.view(-1, 1, 1)).cpu()
    logits = None
    if with_logits:
        last = logit_input[torch.arange(len(token_ids), device=device), lengths - 1]  # (B, d)
        logits = model.get_output_embeddings()(last).cpu()  # (B, V)
    if device.type == "cpu":
        hidden = tuple(states)  # no copy: the writer reads straight from the model's outputs
    else:  # one device->host transfer of a contiguous block beats L+1 small ones
        hidden = torch.stack(states, dim=0).cpu().unbind(0)
    return CapturedBatch(hidden, mean, lengths.tolist(), logits)
