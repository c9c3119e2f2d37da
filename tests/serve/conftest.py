"""Serve-stage fixtures: tiny stores and runs trained on them, built once per test session.

The tiny random Llama (3 blocks, d = 64: L+1 = 4 hidden states, byte tokenizer with a chat template) and the
60-review sentiment set (train 40 / validation 10 / test 10) come from tests/conftest.py. Runs train for two
epochs: the probes only have to be real trained artifacts, not good ones.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

LR = {"pooling": 0.1, "scoring": 3e-2, "mha": 1e-2}


@pytest.fixture(scope="session")
def serve_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="session")
def sentiment_texts(sentiment_csv) -> dict[str, str]:
    """example_id -> text of the sentiment set."""
    with open(sentiment_csv, newline="") as f:
        return {row["id"]: row["text"] for row in csv.DictReader(f)}


def train(store, runs_dir: Path, probe: str, **options) -> Path:
    from probecache.train.runner import TrainOptions, train_run
    from probecache.train.sweep import Grid

    grid = Grid(probe, lrs=(LR[probe],), batch_sizes=(32,), epochs=2, seeds=(0,)) if probe in LR else None
    return train_run(store, TrainOptions(probe=probe, grid=grid, runs_dir=str(runs_dir), progress=False, **options))


@pytest.fixture(scope="session")
def trainer():
    """``train(store, runs_dir, probe, **TrainOptions fields) -> run folder`` (two epochs for probes)."""
    return train


def _trained_runs(store, runs_dir: Path):
    """``get(probe, **options) -> run folder``, trained on first use (keyed by probe and options)."""
    cache: dict = {}

    def get(probe: str, **options) -> Path:
        key = (probe, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = train(store, runs_dir, probe, **options)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def fp32_store(tiny_model, serve_dir, sentiment_csv, extract_tiny_store):
    """fp32 states (differences to serving are float noise only), logits (muli) and text (tfidf)."""
    return extract_tiny_store(tiny_model, serve_dir / "stores", sentiment_csv, dtype="fp32", logits=True,
                              store_text=True)


@pytest.fixture(scope="session")
def bf16_store(tiny_model, serve_dir, sentiment_csv, extract_tiny_store):
    return extract_tiny_store(tiny_model, serve_dir / "stores", sentiment_csv, dtype="bf16", logits=True)


@pytest.fixture(scope="session")
def runs32(fp32_store, serve_dir):
    return _trained_runs(fp32_store, serve_dir / "runs32")


@pytest.fixture(scope="session")
def runs16(bf16_store, serve_dir):
    return _trained_runs(bf16_store, serve_dir / "runs16")


@pytest.fixture(scope="session")
def probed32(tiny_model, runs32):
    """A ProbedModel on the fp32 runs: pooling, scoring, mha, linear (mean), linear (last), muli."""
    from probecache.serve.probed import ProbedModel

    return ProbedModel.from_runs({"pooling": runs32("pooling"), "scoring": runs32("scoring"), "mha": runs32("mha"),
                                  "linear": runs32("linear"), "linear_last": runs32("linear", readout="last"),
                                  "muli": runs32("muli")})
