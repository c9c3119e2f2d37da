"""ProbedModel: scores from inside the forward pass equal the offline evaluation of the same runs, for every kind
of run, batch composition and padding side, with several probes at once and from the generation's own prefill.

Tolerances (also in docs/SERVING.md):

- fp32 store and model: atol 1e-5 on probabilities. The stored states and the served ones differ only in the
  float summation order of differently shaped batches; measured here: <= 2e-7.
- bf16 store and model: atol 1e-2. bf16 keeps 8 significant bits: a kernel that sums in another order (another
  batch shape, padding side or device) moves a state by one bf16 step (0.4 %), and the difference grows through
  the layers. Right-padded classification matched the store exactly here; left-padded generation moved scores
  by up to ~1e-3.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from probecache.serve.errors import ServeError
from probecache.serve.probed import ProbedModel

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ["pooling", "scoring", "mha", "linear", "linear_last", "muli"]
FP32_ATOL, BF16_ATOL = 1e-5, 1e-2


def stored_scores(run_dir, split: str = "test") -> tuple[list[str], np.ndarray]:
    rows = [r for r in pq.read_table(run_dir / "scores.parquet").to_pylist() if r["split"] == split]
    return [r["example_id"] for r in rows], np.array([r["score"] for r in rows])


def all_texts(sentiment_texts) -> list[str]:
    return list(sentiment_texts.values())


# ---- equivalence with the offline evaluation --------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_fp32_scores_equal_the_runs_test_scores(probed32, runs32, sentiment_texts, kind):
    """The served score of every test text equals scores.parquet (what `probecache eval` computes), atol 1e-5."""
    run_dir = runs32("linear", readout="last") if kind == "linear_last" else runs32(kind)
    ids, want = stored_scores(run_dir)
    assert len(ids) == 10
    results = probed32.classify([sentiment_texts[i] for i in ids], batch_size=4)
    got = np.array([r[kind]["score"] for r in results])
    np.testing.assert_allclose(got, want, rtol=0, atol=FP32_ATOL)
    threshold = results[0][kind]["threshold"]
    assert threshold == pytest.approx(__import__("json").loads((run_dir / "config.json").read_text())["threshold"])
    assert [r[kind]["label"] for r in results] == ["pos" if s >= threshold else "neg" for s in got]


def test_bf16_scores_equal_the_runs_test_scores(tiny_model, runs16, sentiment_texts):
    """A bf16 store serves in bf16 (the store's dtype by default) and matches within atol 1e-2."""
    runs = {kind: runs16(kind) for kind in ("pooling", "scoring", "mha", "muli")}
    probed = ProbedModel.from_runs(runs)
    assert probed.model.dtype == torch.bfloat16
    for kind, run_dir in runs.items():
        ids, want = stored_scores(run_dir)
        got = probed.score_ids(probed.encode([sentiment_texts[i] for i in ids])[0], batch_size=3)[kind]
        np.testing.assert_allclose(got, want, rtol=0, atol=BF16_ATOL, err_msg=kind)
    generated = probed.generate([sentiment_texts[i] for i in ids], max_new_tokens=1)  # left padding
    for kind, run_dir in runs.items():
        got = np.array([g["probes"][kind]["score"] for g in generated])
        np.testing.assert_allclose(got, stored_scores(run_dir)[1], rtol=0, atol=BF16_ATOL, err_msg=kind)


# ---- batches and padding ----------------------------------------------------------------------------------


def test_scores_do_not_depend_on_the_batch(probed32, sentiment_texts):
    ids, _ = probed32.encode(all_texts(sentiment_texts))
    alone = probed32.score_ids(ids, batch_size=1)
    for batch_size in (2, 7, 64):
        together = probed32.score_ids(ids, batch_size=batch_size)
        for name in probed32.names:
            np.testing.assert_allclose(together[name], alone[name], rtol=0, atol=FP32_ATOL, err_msg=name)


def test_left_padded_generation_prefill_equals_right_padded_classification(probed32, sentiment_texts):
    texts = all_texts(sentiment_texts)[:12]  # lengths 14..26 tokens: every row but the longest is padded
    classified = probed32.classify(texts, batch_size=12)
    generated = probed32.generate(texts, max_new_tokens=1)
    for c, g in zip(classified, generated, strict=True):
        for name in probed32.names:
            assert g["probes"][name]["score"] == pytest.approx(c[name]["score"], abs=FP32_ATOL)


def test_forward_returns_the_models_outputs_and_the_scores_of_that_pass(probed32, sentiment_texts):
    texts = all_texts(sentiment_texts)[:5]
    ids, _ = probed32.encode(texts)
    longest = max(len(i) for i in ids)
    input_ids = torch.tensor([i + [0] * (longest - len(i)) for i in ids])  # right padding
    mask = torch.tensor([[1] * len(i) + [0] * (longest - len(i)) for i in ids])
    out = probed32(input_ids, attention_mask=mask)
    with torch.no_grad():
        plain = probed32.model(input_ids=input_ids, attention_mask=mask)
    assert torch.equal(out.outputs.logits, plain.logits)  # hooks only observe
    expected = probed32.score_ids(ids, batch_size=5)
    for name in probed32.names:
        np.testing.assert_allclose(out.scores[name], expected[name], rtol=0, atol=FP32_ATOL)
    assert not probed32.model.base_model.layers[0]._forward_pre_hooks  # our hooks are gone after the call


def test_several_probes_in_one_pass_equal_each_alone(tiny_model, runs32, probed32, sentiment_texts):
    texts = all_texts(sentiment_texts)[:6]
    together = probed32.classify(texts)
    for name in ("scoring", "muli"):
        alone = ProbedModel(probed32.model, probed32.tokenizer, {name: runs32(name)}).classify(texts)
        for a, t in zip(alone, together, strict=True):
            assert list(a) == [name] and a[name]["score"] == pytest.approx(t[name]["score"], abs=FP32_ATOL)


def test_generation_scores_come_from_its_own_single_prefill(probed32, sentiment_texts, monkeypatch):
    """One forward over the prompt (T > 1), then one per new token (T = 1): no second pass for the probes."""
    texts = all_texts(sentiment_texts)[:3]
    lengths = []
    handle = probed32.model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append((kwargs.get("input_ids") if kwargs.get("input_ids") is not None
                                                     else kwargs["inputs_embeds"]).shape[1]), with_kwargs=True)
    try:
        out = probed32.generate(texts, max_new_tokens=4, min_new_tokens=4)
    finally:
        handle.remove()
    prompt = max(len(i) for i in probed32.encode(texts)[0])
    assert lengths == [prompt, 1, 1, 1]
    assert all(r["new_tokens"] == 4 and not r["refused"] and isinstance(r["text"], str) for r in out)
    expected = probed32.classify(texts)
    for r, e in zip(out, expected, strict=True):
        assert r["probes"]["mha"]["score"] == pytest.approx(e["mha"]["score"], abs=FP32_ATOL)


def test_long_prompts_read_only_the_first_max_tokens(probed32, runs32, sentiment_texts, monkeypatch):
    """Right truncation, opted in to (truncate=True): classify cuts the prompt like the extractor; generate feeds
    the whole prompt, and each probe reads its first max_tokens tokens, whose states (causal attention) are those of
    the cut prompt. (Without truncate=True such prompts are refused: tests/serve/test_limits.py.)"""
    text = " ".join(all_texts(sentiment_texts)[:8])  # ~170 tokens
    monkeypatch.setattr(probed32, "tokenisation", probed32.tokenisation.__class__("raw", "right", 40))
    for run in probed32.runs:
        monkeypatch.setitem(run.store, "max_tokens", 40)
    ids, lengths = probed32.encode([text])
    assert len(ids[0]) == 40 and lengths[0] > 100
    classified = probed32.classify([text], truncate=True)[0]
    generated = probed32.generate([text], max_new_tokens=1, truncate=True)[0]
    assert generated["truncated"] and generated["prompt_tokens"] == lengths[0]
    for name in probed32.names:
        assert classified[name]["truncated"] and generated["probes"][name]["truncated"]
        assert generated["probes"][name]["score"] == pytest.approx(classified[name]["score"], abs=FP32_ATOL)


def test_empty_and_single_string_inputs_are_refused(probed32):
    with pytest.raises(ServeError, match="no tokens"):
        probed32.classify(["ok", ""])
    with pytest.raises(TypeError, match="list of texts"):
        probed32.classify("a single string")
    assert probed32.classify([]) == []
