"""A run trained on a capture subset (extract --tokens / --layers) reads, inside the model's own forward pass, the
same tokens and layers it was trained on: its served scores equal the run's offline test scores."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from probecache.serve.probed import ProbedModel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def subset_runs(tiny_model, serve_dir, sentiment_csv, extract_tiny_store, trainer):
    stores = {spec: extract_tiny_store(tiny_model, serve_dir / "subset-stores", sentiment_csv, dtype="fp32",
                                       tokens=spec, layers="1-3")
              for spec in ("last-3", "every-2")}
    return {f"{probe}-{spec}": trainer(store, serve_dir / "subset-runs", probe)
            for spec, store in stores.items() for probe in ("scoring", "mha")}


def test_served_scores_of_token_subset_runs_equal_their_test_scores(subset_runs, sentiment_texts):
    probed = ProbedModel.from_runs(subset_runs)
    for name, run_dir in subset_runs.items():
        config = json.loads((run_dir / "config.json").read_text())
        assert config["tokens"] == name.split("-", 1)[1] and config["layers"] == [1, 2, 3]
        rows = [r for r in pq.read_table(run_dir / "scores.parquet").to_pylist() if r["split"] == "test"]
        results = probed.classify([sentiment_texts[r["example_id"]] for r in rows], batch_size=4)
        got = np.array([r[name]["score"] for r in results])
        np.testing.assert_allclose(got, [r["score"] for r in rows], rtol=0, atol=1e-5, err_msg=name)


def test_without_the_token_mask_the_scores_would_differ(subset_runs, sentiment_texts, monkeypatch):
    """The check above can fail: serving every token instead of the kept ones moves the scores."""
    from probecache.serve.loading import ServedRun
    from probecache.store.token_policy import parse_token_policy

    monkeypatch.setattr(ServedRun, "tokens", property(lambda self: parse_token_policy("all")))
    run_dir = subset_runs["scoring-last-3"]
    rows = [r for r in pq.read_table(run_dir / "scores.parquet").to_pylist() if r["split"] == "test"]
    results = ProbedModel.from_runs({"r": run_dir}).classify([sentiment_texts[r["example_id"]] for r in rows])
    assert np.abs(np.array([r["r"]["score"] for r in results]) - [r["score"] for r in rows]).max() > 1e-3
