"""Probes (train/probes.py): paper parameter counts, masking, learning a planted signal, artifacts, bad configs.

Synthetic tensors only: no store, no model.
"""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch
from probecache.train.errors import TrainError
from probecache.train.probes import (
    PROBES,
    ProbeConfig,
    build_probe,
    count_parameters,
    load_probe,
    save_probe,
)
from safetensors import safe_open
from safetensors.torch import save_file

# every operator variant the tests cover: (name, pool)
VARIANTS = [("pooling", "mean"), ("pooling", "max"), ("scoring", "mean"), ("mha", "mean"), ("mha", "max")]
VARIANT_IDS = [f"{name}-{pool}" for name, pool in VARIANTS]


def make_probe(name: str, pool: str = "mean", n_layers: int = 4, d: int = 16, n_classes: int = 2,
               seed: int = 0, **kw) -> torch.nn.Module:
    """A probe with random (not initial) weights: the scoring gates start at w = 0, which would hide masking bugs."""
    torch.manual_seed(seed)
    probe = build_probe(ProbeConfig(name, n_layers, d, n_classes=n_classes, pool=pool, downcast=2, heads=2, **kw))
    with torch.no_grad():
        for p in probe.parameters():
            p.normal_(0.0, 1.0 / d**0.5)
    return probe


# --- parameter counts on the paper's model size (Llama-3.2-3B: d = 3072, L = 28 -> L1 = 29) ---

PAPER = dict(n_layers=29, hidden_size=3072)


def test_pooling_has_only_the_head():
    with torch.device("meta"):
        probe = build_probe(ProbeConfig("pooling", **PAPER))
    assert count_parameters(probe, include_head=False) == 0
    assert count_parameters(probe) == 3072 + 1  # one logit: d weights + 1 bias
    with torch.device("meta"):
        probe = build_probe(ProbeConfig("pooling", **PAPER, n_classes=5))
    assert count_parameters(probe) == 5 * 3072 + 5


def test_scoring_is_l_plus_2_gates():
    with torch.device("meta"):
        probe = build_probe(ProbeConfig("scoring", **PAPER))
    assert count_parameters(probe, include_head=False) == 30 * 3072 == 92_160  # (L+2)·d
    assert count_parameters(probe) == 92_160 + 3073
    assert round(count_parameters(probe) / 1e6, 2) == 0.10  # the paper's "0.10M"


@pytest.mark.parametrize("downcast, millions", [(4, 283), (8, 142), (16, 71), (32, 35), (64, 18)])
def test_mha_matches_the_paper(downcast, millions):
    with torch.device("meta"):  # 283M parameters would take 1.1 GB: allocate nothing
        probe = build_probe(ProbeConfig("mha", **PAPER, downcast=downcast, heads=8))
    d_inner = 3072 // downcast
    weights = count_parameters(probe, include_head=False, include_bias=False)
    assert weights == 30 * 4 * 3072 * d_inner  # L+2 modules of Q, K, V and output projections
    assert round(weights / 1e6) == millions
    biases = count_parameters(probe, include_head=False) - weights
    assert biases == 30 * (3 * d_inner + 3072)
    assert count_parameters(probe) == weights + biases + 3073


# --- masking: padding never influences the output ---

def pad_batch(examples: list[torch.Tensor], T: int, garbage: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (L1, t_i, d) examples to T with garbage in the padded positions."""
    g = torch.Generator().manual_seed(seed)
    L1, _, d = examples[0].shape
    hidden = torch.empty(len(examples), L1, T, d)
    if garbage == "huge":
        hidden.copy_(torch.randn(hidden.shape, generator=g) * 1e6 + 3e6)
    else:  # non-finite: inf, -inf and NaN
        hidden.copy_(torch.tensor([float("inf"), float("-inf"), float("nan")])[torch.randint(0, 3, hidden.shape,
                                                                                             generator=g)])
    mask = torch.zeros(len(examples), T, dtype=torch.bool)
    for i, x in enumerate(examples):
        hidden[i, :, : x.shape[1]] = x
        mask[i, : x.shape[1]] = True
    return hidden, mask


@pytest.mark.parametrize("name, pool", VARIANTS, ids=VARIANT_IDS)
def test_padding_never_changes_the_output(name, pool):
    probe = make_probe(name, pool, n_classes=3)
    g = torch.Generator().manual_seed(1)
    examples = [torch.randn(4, t, 16, generator=g) for t in (5, 1, 3, 7)]  # (L1, t, d)
    alone = torch.cat([probe(x[None], torch.ones(1, x.shape[1], dtype=torch.bool)) for x in examples])  # (4, 3)
    assert alone.shape == (4, 3) and torch.isfinite(alone).all()
    for T, garbage in [(7, "huge"), (11, "huge"), (16, "nonfinite")]:
        hidden, mask = pad_batch(examples, T, garbage, seed=T)
        batched = probe(hidden, mask)
        assert torch.allclose(batched, alone, atol=1e-5), (T, garbage, (batched - alone).abs().max())


@pytest.mark.parametrize("name, pool", VARIANTS, ids=VARIANT_IDS)
def test_masked_positions_get_no_gradient(name, pool):
    probe = make_probe(name, pool)
    hidden, mask = pad_batch([torch.randn(4, t, 16) for t in (2, 6)], 9, "huge")
    hidden.requires_grad_(True)
    probe(hidden, mask).sum().backward()
    assert hidden.grad[~mask[:, None, :, None].expand_as(hidden)].abs().max() == 0
    assert hidden.grad[mask[:, None, :, None].expand_as(hidden)].abs().max() > 0
    assert all(torch.isfinite(p.grad).all() for p in probe.parameters())


@pytest.mark.parametrize("name, pool", VARIANTS, ids=VARIANT_IDS)
def test_any_input_dtype_batch_1_and_t_1(name, pool):
    probe = make_probe(name, pool)
    x = torch.randn(1, 4, 1, 16).to(torch.bfloat16)  # batch size 1, one token
    mask = torch.ones(1, 1, dtype=torch.bool)
    out = probe(x, mask)
    assert out.dtype == torch.float32 and out.shape == (1, 1)
    assert torch.equal(out, probe(x.float(), mask))  # computed in float32 from the bf16 values
    assert torch.equal(probe(x.half(), mask), probe(x.half().float(), mask))
    assert torch.equal(probe(x.float(), mask.long()), out)  # a 0/1 attention mask works too


@pytest.mark.parametrize("name, pool", VARIANTS, ids=VARIANT_IDS)
def test_an_example_without_tokens_is_finite(name, pool):
    probe = make_probe(name, pool)
    hidden, mask = pad_batch([torch.randn(4, 3, 16)], 5, "huge")
    mask[:] = False
    assert torch.isfinite(probe(hidden, mask)).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name, pool", VARIANTS, ids=VARIANT_IDS)
def test_cuda_matches_cpu(name, pool):
    probe = make_probe(name, pool)
    examples = [torch.randn(4, t, 16) for t in (5, 1, 3, 7)]
    hidden, mask = pad_batch(examples, 9, "huge")
    cpu = probe(hidden, mask)
    gpu = probe.cuda()(hidden.cuda().bfloat16(), mask.cuda())
    assert torch.allclose(gpu.cpu(), probe.cpu()(hidden.bfloat16(), mask), atol=1e-4)
    assert torch.allclose(gpu.cpu(), cpu, atol=0.05)  # bf16 rounding of the input only


def test_wrong_shapes_are_refused():
    probe = make_probe("scoring")
    with pytest.raises(ValueError, match="L1=4"):
        probe(torch.randn(2, 5, 3, 16), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be"):
        probe(torch.randn(2, 4, 3, 16), torch.ones(2, 4, dtype=torch.bool))


# --- learning: a class planted in one direction at one layer of a few tokens ---

D, L1, T, PLANTED_LAYER, STRENGTH = 32, 6, 12, 3, 8.0


def planted_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise; at layer 3, two random valid tokens get ±8·u (sign = class). Variable lengths, garbage padding."""
    u = torch.nn.functional.normalize(torch.randn(D, generator=torch.Generator().manual_seed(123)), dim=0)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    lengths = torch.randint(4, T + 1, (n,), generator=g)
    mask = torch.arange(T) < lengths[:, None]  # (n, T)
    hidden = torch.randn(n, L1, T, D, generator=g)  # (n, L1, T, d)
    # two random valid positions per example: the top-2 of random scores with padding at -inf
    picks = torch.rand(n, T, generator=g).masked_fill(~mask, -1.0).topk(2, dim=1).indices  # (n, 2)
    sign = (2 * y - 1).float()[:, None, None]  # (n, 1, 1)
    rows = torch.arange(n)[:, None]
    hidden[rows, PLANTED_LAYER, picks] += STRENGTH * sign * u  # (n, 2, d)
    hidden.masked_fill_(~mask[:, None, :, None], 1e4)  # garbage padding
    return hidden, mask, y


@pytest.fixture(scope="module")
def planted():
    return planted_data(400, seed=1), planted_data(400, seed=2)


def fit(probe: torch.nn.Module, hidden: torch.Tensor, mask: torch.Tensor, y: torch.Tensor, lr: float,
        steps: int = 200) -> None:
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(0, len(y), (64,), generator=g)
        logit = probe(hidden[batch], mask[batch])[:, 0]  # binary: one logit
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y[batch].float())
        opt.zero_grad()
        loss.backward()
        opt.step()


# Raw states (the paper's probes) for every operator; with RMS-normalised tokens (the default) for the learned
# ones. Pooling of normalised tokens is not asked to find this planted signal: normalisation shrinks the two
# spiked tokens to the scale of the noise, and an unweighted mean or max over 12 tokens x 6 layers drowns them.
@pytest.mark.parametrize("name, pool, lr, norm", [(n, p, 3e-3 if n == "mha" else 1e-2, "none") for n, p in VARIANTS]
                         + [("scoring", "mean", 1e-2, "rms"), ("mha", "mean", 3e-3, "rms")],
                         ids=[f"{i}-raw" for i in VARIANT_IDS] + ["scoring-rms", "mha-rms"])
def test_probe_learns_a_planted_signal(planted, name, pool, lr, norm):
    (train_h, train_m, train_y), (test_h, test_m, test_y) = planted
    torch.manual_seed(0)
    probe = build_probe(ProbeConfig(name, L1, D, pool=pool, downcast=4, heads=2, norm=norm))
    fit(probe, train_h, train_m, train_y, lr)
    with torch.no_grad():
        accuracy = ((probe(test_h, test_m)[:, 0] > 0).long() == test_y).float().mean().item()
    assert accuracy > 0.9, accuracy
    if name == "scoring":
        with torch.no_grad():
            weights = probe.layer_weights(test_h, test_m)  # (B, L1)
        assert weights.shape == (400, L1) and torch.allclose(weights.sum(1), torch.ones(400))
        assert weights.mean(0).argmax().item() == PLANTED_LAYER, weights.mean(0)


def test_layer_weights_only_for_scoring():
    hidden, mask = torch.randn(2, 4, 3, 16), torch.ones(2, 3, dtype=torch.bool)
    for name in ("pooling", "mha"):
        with pytest.raises(NotImplementedError, match="scoring"):
            make_probe(name).layer_weights(hidden, mask)
    assert make_probe("scoring").layer_weights(hidden, mask).shape == (2, 4)


# --- artifacts ---

@pytest.mark.parametrize("name, pool", VARIANTS, ids=VARIANT_IDS)
def test_save_load_round_trip_without_pickle(tmp_path, monkeypatch, name, pool):
    probe = make_probe(name, pool, n_classes=3)
    config = probe.config
    path = tmp_path / "probe.safetensors"
    save_probe(probe, config, path)
    with safe_open(str(path), framework="pt") as f:  # a valid safetensors file, config in its metadata
        assert set(f.keys()) == set(probe.state_dict())
        assert '"name": "' + name + '"' in f.metadata()["probecache.probe_config"]

    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    loaded, loaded_config = load_probe(path)
    assert loaded_config == config and type(loaded) is PROBES[name]
    hidden, mask = pad_batch([torch.randn(4, t, 16) for t in (5, 2)], 6, "huge")
    assert torch.equal(loaded(hidden, mask), probe(hidden, mask))
    assert all(p.device.type == "cpu" and p.requires_grad for p in loaded.parameters())


def test_save_refuses_a_config_that_did_not_build_the_probe(tmp_path):
    probe = make_probe("scoring")
    with pytest.raises(ValueError, match="built from"):
        save_probe(probe, ProbeConfig("scoring", 4, 16, n_classes=3), tmp_path / "p.safetensors")


def test_load_refuses_a_plain_safetensors_file(tmp_path):
    save_file({"w": torch.zeros(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(TrainError, match="not a probecache probe"):
        load_probe(tmp_path / "plain.safetensors")


# --- bad configs name the fix ---

@pytest.mark.parametrize("kwargs, message", [
    (dict(name="mha", n_layers=29, hidden_size=3072, downcast=5), r"downcast 5 does not divide .*choose a downcast"),
    (dict(name="mha", n_layers=2, hidden_size=64, downcast=8, heads=3), r"heads 3 does not divide .*choose heads"),
    (dict(name="linear", n_layers=2, hidden_size=64), r"unknown probe 'linear': choose one of pooling, scoring, mha"),
    (dict(name="pooling", n_layers=2, hidden_size=64, pool="sum"), r"unknown pool 'sum': choose one of mean, max"),
    (dict(name="scoring", n_layers=2, hidden_size=64, n_classes=1), r"n_classes must be at least 2"),
    (dict(name="scoring", n_layers=0, hidden_size=64), r"n_layers must be a positive integer"),
])
def test_bad_config_raises_train_error(kwargs, message):
    with pytest.raises(TrainError, match=message):
        build_probe(ProbeConfig(**kwargs))


def test_downcast_is_only_checked_for_mha():
    # pooling and scoring ignore downcast and heads: a d that 8 does not divide is fine for them
    for name in ("pooling", "scoring"):
        assert build_probe(ProbeConfig(name, 2, 12, downcast=8, heads=8)).config.hidden_size == 12


def test_probes_import_no_transformers_and_no_other_stage():
    # a subprocess: in this one, other tests may already have imported transformers
    code = ("import sys, probecache.train.probes; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers' "
            "or m.startswith(('probecache.extract', 'probecache.cli', 'probecache.serve'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
