"""Which runs can be served, and with what model: one-line ValueErrors that name the fix for every mismatch
(other weights, other tokenizer or chat template, other prompt format, other shapes, text-only baselines), and
chat-formatted runs served with the extractor's exact chat tokenisation."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from probecache.lm.models import load_model, resolve_model
from probecache.serve.errors import ServeError
from probecache.serve.loading import load_run
from probecache.serve.probed import ProbedModel, run_names

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def chat_run(tiny_model, serve_dir, sentiment_csv, extract_tiny_store, trainer):
    store = extract_tiny_store(tiny_model, serve_dir / "chat", sentiment_csv, dtype="fp32", prompt_format="chat")
    return trainer(store, serve_dir / "runs-chat", "scoring")


@pytest.fixture(scope="module")
def other_run(tiny_model_other_weights, serve_dir, sentiment_csv, extract_tiny_store, trainer):
    store = extract_tiny_store(tiny_model_other_weights, serve_dir / "other", sentiment_csv, dtype="fp32")
    return trainer(store, serve_dir / "runs-other", "pooling")


def test_tfidf_runs_are_refused(runs32):
    with pytest.raises(ServeError, match="tfidf baseline: it reads the raw text") as e:
        ProbedModel.from_runs([runs32("tfidf")])
    one_line(e)


def test_runs_of_different_models_are_refused(runs32, other_run):
    with pytest.raises(ServeError, match="come from different models") as e:
        ProbedModel.from_runs([runs32("pooling"), other_run])
    assert "separate processes" in one_line(e)


def test_a_model_with_other_weights_is_refused(runs32, tiny_model_other_weights, probed32):
    with pytest.raises(ServeError, match="resolves to weights") as e:
        ProbedModel.from_runs([runs32("pooling")], model=str(tiny_model_other_weights))
    assert "--model" in one_line(e)
    source = resolve_model(str(tiny_model_other_weights))
    model, tokenizer = load_model(source, probed32.model.dtype, "cpu")
    with pytest.raises(ServeError, match="resolves to weights"):
        ProbedModel(model, tokenizer, [runs32("pooling")], source=source)


def test_another_chat_template_is_refused(runs32, tiny_model, tmp_path):
    edited = shutil.copytree(tiny_model, tmp_path / "edited")
    (edited / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ServeError, match="chat template differs") as e:
        ProbedModel.from_runs([runs32("pooling")], model=str(edited))  # same weights, other template
    one_line(e)


def test_runs_with_different_prompt_formats_are_refused(runs32, chat_run):
    with pytest.raises(ServeError, match="different tokenisations \\(prompt_format: 'raw' vs 'chat'\\)") as e:
        ProbedModel.from_runs({"raw": runs32("pooling"), "chat": chat_run})
    assert "--prompt-format" in one_line(e)


def test_chat_runs_need_a_chat_template(chat_run, probed32, monkeypatch):
    monkeypatch.setattr(probed32.tokenizer, "chat_template", None)
    with pytest.raises(ServeError, match="has no chat template") as e:
        ProbedModel(probed32.model, probed32.tokenizer, [chat_run])
    one_line(e)


def test_chat_runs_serve_their_stores_scores(chat_run, sentiment_texts):
    """The chat template with the generation prompt, exactly as extracted (fp32: atol 1e-5)."""
    probed = ProbedModel.from_runs([chat_run])
    ids, lengths = probed.encode(["hi"])
    assert probed.tokenizer.decode(ids[0]) == "<s>user: hi</s><s>assistant:"
    rows = [r for r in pq.read_table(chat_run / "scores.parquet").to_pylist() if r["split"] == "test"]
    got = probed.classify([sentiment_texts[r["example_id"]] for r in rows])
    np.testing.assert_allclose([g[chat_run.name]["score"] for g in got], [r["score"] for r in rows], atol=1e-5)


def test_a_model_of_another_shape_is_refused(runs32, probed32):
    from transformers import LlamaForCausalLM

    config = copy.deepcopy(probed32.model.config)
    config.num_hidden_layers = 2
    model = LlamaForCausalLM(config).eval()
    tokenizer = probed32.tokenizer
    with pytest.raises(ServeError, match="4 hidden states of width 64, this model has 3") as e:
        ProbedModel(model, tokenizer, [runs32("pooling")])
    assert "load the model the run was trained with" in one_line(e)


def test_run_folders_and_names(runs32, tmp_path):
    with pytest.raises(ServeError, match="not a complete probecache run"):
        load_run(tmp_path)
    run = runs32("pooling")
    with pytest.raises(ServeError, match="share the name"):
        ProbedModel.from_runs([run, run])
    assert run_names([f"tox={run}", str(run)]) == {"tox": run, run.name: run}
    with pytest.raises(ServeError, match="share a name"):
        run_names([str(run), str(run)])
    served = load_run(run, "tox")
    assert (served.name, served.kind, served.layers, served.label_names) == ("tox", "pooling", [0, 1, 2, 3],
                                                                             ["neg", "pos"])
