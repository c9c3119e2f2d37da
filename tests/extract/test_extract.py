"""Extraction on a tiny random Llama: exact stored values, layout, identity, cache hits, resume, pooling."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from probecache.extract.plan import batches, make_plan
from probecache.extract.run import extract
from probecache.lm.tokens import pad_batch
from probecache.store.errors import StoreError
from transformers import AutoModelForCausalLM, AutoTokenizer

from probecache import open_store


def _model(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(), AutoTokenizer.from_pretrained(path)


def _segment_batches(store, config, tokenizer):
    """The batches the extractor ran, recomputed from the deterministic plan: {shard: [[example ids]]}."""
    from probecache.extract.datasets import load_dataset
    from probecache.extract.plan import select_examples

    ds = load_dataset(config.dataset)
    plan = make_plan(select_examples(ds.splits, config.limit, config.seed), tokenizer, config)
    by_shard: dict[int, list] = {}
    for p in plan:
        by_shard.setdefault(p.shard_id, []).append(p)
    return {s: batches(ps, config.batch_tokens, config.max_batch_size) for s, ps in by_shard.items()}


@pytest.mark.parametrize("dtype,torch_dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                               ("fp16", torch.float16)])
def test_stored_states_equal_model_output_hidden_states_exactly(extract_config, tiny_model, dtype, torch_dtype):
    config = extract_config(dtype=dtype)
    result = extract(config)
    store = open_store(result.store_path)
    model, tokenizer = _model(tiny_model, torch_dtype)
    n_layers = model.config.num_hidden_layers + 1
    checked = 0
    for shard_batches in _segment_batches(store, config, tokenizer).values():
        for batch in shard_batches:
            ids, mask = pad_batch([p.token_ids for p in batch], tokenizer.pad_token_id, "cpu")
            with torch.no_grad():  # the full model, as a user would call it
                states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            assert len(states) == n_layers
            for b, p in enumerate(batch):
                stored = store.hidden(p.example.example_id)  # (L+1, n, d)
                expected = torch.stack([h[b, : p.n_tokens] for h in states])
                assert stored.dtype == torch_dtype
                assert torch.equal(stored, expected), p.example.example_id
                checked += 1
    assert checked == 30


@pytest.mark.parametrize("dtype,torch_dtype,tol", [("fp32", torch.float32, 1e-4), ("bf16", torch.bfloat16, 0.05)])
def test_each_example_matches_its_solo_forward_within_tolerance(extract_config, tiny_model, dtype, torch_dtype, tol):
    """Batching changes accumulation order only: stated tolerance is 1e-4 (fp32) / 5% of scale (bf16)."""
    store = open_store(extract(extract_config(dtype=dtype, store_text=True)).store_path)
    model, tokenizer = _model(tiny_model, torch_dtype)
    for row in store.manifest(columns=["example_id", "text"]).to_pylist()[:12]:
        eid, text = row["example_id"], row["text"]
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            solo = torch.stack(model(input_ids=ids, output_hidden_states=True).hidden_states)[:, 0]
        stored = store.hidden(eid)
        scale = solo.float().abs().amax(dim=(1, 2), keepdim=True).clamp_min(1.0)  # per layer
        assert ((stored.float() - solo.float()).abs() / scale).max() <= tol


def test_no_padding_is_stored_and_offsets_tile_each_segment(extract_config):
    store = open_store(extract(extract_config()).store_path)
    m = store.manifest().to_pandas()
    assert len(m) == 30 and m.example_id.is_unique
    mixed = 0
    for segment, rows in m.groupby("segment"):
        rows = rows.sort_values("token_offset")
        assert rows.token_offset.iloc[0] == 0
        runs = [split for k, split in enumerate(rows.split) if k == 0 or split != rows.split.iloc[k - 1]]
        assert len(runs) == len(set(runs)), runs  # each split one contiguous token range: loaders decode only it
        mixed += len(runs) > 1
        assert (rows.token_offset.values[1:] == (rows.token_offset + rows.n_tokens).values[:-1]).all()
        assert sorted(rows.row) == list(range(len(rows)))
        import zarr

        hidden = zarr.open_group(str(store.layout.segment(segment)), mode="r")["hidden"]
        assert hidden.shape == (store.n_layers, rows.n_tokens.sum(), store.hidden_size)  # no padding rows
    assert mixed  # the fixture has shards holding several splits
    assert (m.n_tokens == m.n_tokens_original).all() and not m.truncated.any()


def test_pooled_arrays_are_exact_summaries_of_stored_tokens(extract_config):
    store = open_store(extract(extract_config(dtype="bf16")).store_path)
    ids = store.manifest(columns=["example_id"])["example_id"].to_pylist()
    mean, last = store.mean(ids), store.last(ids)
    assert mean.shape == (30, store.n_layers, store.hidden_size) and mean.dtype == torch.float32
    for i, eid in enumerate(ids):
        h = store.hidden(eid)
        torch.testing.assert_close(mean[i], h.float().mean(dim=1), rtol=1e-5, atol=1e-5)
        assert torch.equal(last[i], h[:, -1])
    sub = store.mean([ids[5], ids[2]], layers=[0, 2])
    assert torch.equal(sub, mean[[5, 2]][:, [0, 2]])


def test_logits_equal_the_lm_head_at_the_last_prompt_position(extract_config, tiny_model):
    store = open_store(extract(extract_config(logits=True)).store_path)
    model, tokenizer = _model(tiny_model)
    m = store.manifest(columns=["example_id", "n_tokens"]).to_pylist()[:5]
    stored = store.logits([r["example_id"] for r in m])
    for i, r in enumerate(m):
        h = store.hidden(r["example_id"], layers=-1)[0, -1]  # final normed state of the last token
        torch.testing.assert_close(stored[i], model.lm_head(h), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="no logits"):
        open_store(extract(extract_config()).store_path).logits()


def test_truncation_is_recorded_per_example(extract_config):
    store = open_store(extract(extract_config(max_tokens=10)).store_path)
    m = store.manifest().to_pandas()
    assert (m.n_tokens <= 10).all()
    assert (m.truncated == (m.n_tokens_original > 10)).all() and m.truncated.any()
    left = open_store(extract(extract_config(max_tokens=10, truncation_side="left")).store_path)
    assert left.store_id != store.store_id


def test_chat_format_wraps_the_prompt_in_the_template(extract_config, tiny_model):
    raw = open_store(extract(extract_config()).store_path).manifest().to_pandas().set_index("example_id")
    chat = open_store(extract(extract_config(prompt_format="chat")).store_path).manifest().to_pandas()
    chat = chat.set_index("example_id")
    _, tokenizer = _model(tiny_model)
    empty = tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False,
                                          add_generation_prompt=True)
    assert empty == "<s>user: </s><s>assistant:"
    overhead = len(tokenizer(empty, add_special_tokens=False)["input_ids"])  # 3 specials + 16 bytes
    assert overhead == 19
    assert ((chat.n_tokens - raw.n_tokens.loc[chat.index]) == overhead).all()


def test_same_extraction_twice_is_a_cache_hit_that_writes_nothing(extract_config):
    first = extract(extract_config())
    snapshot = {p: os.stat(p).st_mtime_ns for p in _files(first.store_path)}
    second = extract(extract_config(batch_tokens=64))  # run options are not identity
    assert second.cache_hit and second.store_path == first.store_path and second.shards_run == 0
    assert {p: os.stat(p).st_mtime_ns for p in _files(first.store_path)} == snapshot


def _files(root):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


def test_interrupted_store_resumes_only_missing_shards_with_equal_values(extract_config):
    config = extract_config()
    full = open_store(extract(config).store_path)
    reference = {e: full.hidden(e) for e in full.manifest()["example_id"].to_pylist()}
    # an attempt that died before its commit: the segment exists but the part does not
    part = full.layout.part(2)
    part.unlink()
    partial = open_store(full.path)
    assert partial.summary()["shards_committed"] == 3 and partial.manifest().num_rows < 30
    result = extract(config)
    assert not result.cache_hit and result.shards_run == 1
    resumed = open_store(result.store_path)
    assert resumed.summary()["complete"]
    for eid, h in reference.items():
        assert torch.equal(resumed.hidden(eid), h)
    orphans = [s for s in os.listdir(full.layout.segments) if s.startswith("shard-00002-")]
    assert len(orphans) == 2  # the dead attempt is left for gc; readers never see it


def test_parallel_encoding_writes_byte_identical_segments(extract_config, tmp_path):
    """--encode-threads only moves blosc onto a pool: every stored array file is the same bytes."""
    serial = extract(extract_config(encode_threads=0))
    parallel = extract(extract_config(encode_threads=2, root=str(tmp_path / "parallel")))
    assert parallel.store_id == serial.store_id

    def chunk_files(root) -> dict[str, bytes]:  # relative path within each shard's segment -> bytes
        out = {}
        for seg in sorted((Path(root) / "segments").iterdir()):
            shard = seg.name.rsplit("-", 2)[0]  # shard-00003-<attempt>: attempts differ between the two runs
            for f in seg.rglob("*"):
                if f.is_file() and f.name != "zarr.json":
                    out[f"{shard}/{f.relative_to(seg)}"] = f.read_bytes()
        return out

    assert chunk_files(parallel.store_path) == chunk_files(serial.store_path) != {}


def test_encode_threads_default_to_none_on_cpu_and_idle_cores_on_a_gpu(monkeypatch):
    from probecache.extract.jobs import encode_threads_for

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert encode_threads_for(None, "cpu") == 0 and encode_threads_for(None, "cuda:0") == 15
    assert encode_threads_for(3, "cpu") == 3


def test_store_id_changes_with_identity_fields_only(extract_config, tiny_model_other_weights, tmp_path):
    base = extract(extract_config()).store_id
    same = {
        "batch_tokens": 50, "max_batch_size": 3, "progress": True, "device": "cpu", "encode_threads": 2,
    }
    for field, value in same.items():
        assert extract(extract_config(**{field: value})).store_id == base, field
    assert extract(extract_config(root=str(tmp_path / "elsewhere"))).store_id == base
    different = {
        "dtype": "bf16", "max_tokens": 12, "prompt_format": "chat", "logits": True, "store_text": True,
        "store_token_ids": True,
        "shard_size": 5, "limit": 20, "model": str(tiny_model_other_weights),
        "splits": ("train",),
    }
    seen = {base}
    for field, value in different.items():
        store_id = extract(extract_config(**{field: value})).store_id
        assert store_id not in seen, field
        seen.add(store_id)
    lossy = extract(extract_config(dtype="bf16", mantissa_bits=4)).store_id  # rounding needs bf16
    assert lossy not in seen


def test_store_id_changes_when_dataset_content_changes(extract_config, tiny_csv):
    before = extract(extract_config()).store_id
    text = tiny_csv.read_text().replace("great film", "great films")
    tiny_csv.write_text(text)
    assert extract(extract_config()).store_id != before


def test_text_is_stored_only_on_opt_in(extract_config):
    plain = open_store(extract(extract_config()).store_path)
    assert "text" not in plain.manifest().column_names
    for path in _files(plain.path):  # every table and document in the store, decoded
        if path.endswith(".parquet"):
            cells = [str(v) for column in pq.read_table(path).to_pydict().values() for v in column]
        elif path.endswith(".json"):
            cells = [open(path).read()]
        else:
            continue
        assert not any("great film" in c or "a quiet masterpiece" in c for c in cells), path
    opted = open_store(extract(extract_config(store_text=True)).store_path)
    rows = opted.manifest(columns=["example_id", "text"]).to_pylist()
    assert {"example_id": "r00", "text": "great film"} in rows


def test_mantissa_rounding_is_bounded_and_compresses_more(extract_config):
    exact = open_store(extract(extract_config(dtype="bf16")).store_path)
    lossy = open_store(extract(extract_config(dtype="bf16", mantissa_bits=3)).store_path)
    for eid in ["r00", "r13"]:
        a, b = exact.hidden(eid).float(), lossy.hidden(eid).float()
        rel = ((a - b).abs() / a.abs().clamp_min(1e-30))[a != 0]
        assert rel.max() <= 2.0 ** -4 + 1e-6  # half an ulp at 3 mantissa bits
    assert lossy.summary()["bytes_stored"] < exact.summary()["bytes_stored"]


def test_limit_takes_a_deterministic_sample_over_all_splits(extract_config):
    store = open_store(extract(extract_config(limit=10)).store_path)
    m = store.manifest().to_pandas()
    assert len(m) == 10 and set(m.split) == {"train", "validation", "test"}
    again = open_store(extract(extract_config(limit=10, root=str(store.path.parent.parent / "other"))).store_path)
    assert sorted(again.manifest()["example_id"].to_pylist()) == sorted(m.example_id)


def test_store_json_records_weights_identity_and_no_text(extract_config):
    store = open_store(extract(extract_config()).store_path)
    info = json.loads((store.path / "store.json").read_text())
    assert info["model"]["weights_id"].startswith("sha256:") and len(info["model"]["weights_id"]) == 71
    assert info["identity"]["model_weights"] == info["model"]["weights_id"]
    assert info["model"]["n_layers"] == 4 and store.n_layers == 4
    assert "great film" not in json.dumps(info)


def test_reader_layer_selection(extract_config):
    store = open_store(extract(extract_config()).store_path)
    full = store.hidden("r05")
    assert torch.equal(store.hidden("r05", layers=[3, 0, 1]), full[[3, 0, 1]])
    assert torch.equal(store.hidden("r05", layers=slice(1, 3)), full[1:3])
    assert torch.equal(store.hidden("r05", layers=-1), full[-1:])
    with pytest.raises(Exception, match="out of range"):
        store.hidden("r05", layers=[9])
    with pytest.raises(Exception, match="not in store"):
        store.hidden("nope")
    assert sorted(store.manifest(split="test")["example_id"].to_pylist()) == [f"r{i}" for i in range(25, 30)]


def test_copied_store_still_reads(extract_config, tmp_path):
    store = open_store(extract(extract_config()).store_path)
    copy = tmp_path / "copy" / store.store_id
    shutil.copytree(store.path, copy)
    assert torch.equal(open_store(copy).hidden("r07"), store.hidden("r07"))


def test_a_failing_shard_leaves_a_log_that_status_shows_and_a_rerun_resumes(extract_config, monkeypatch):
    from probecache.extract import shard as shard_module
    from probecache.store.status import store_status

    real_capture = shard_module.capture
    config = extract_config()

    def capture_that_runs_out_of_memory(*args, **kwargs):  # a CUDA OOM once the first shard is committed
        if list(Path(config.root).glob("*/manifests/part-*.parquet")):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_capture(*args, **kwargs)

    monkeypatch.setattr(shard_module, "capture", capture_that_runs_out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        extract(config)
    (store_path,) = Path(config.root).iterdir()
    status = store_status(store_path)
    committed = status["counts"]["committed"]
    assert committed >= 1 and status["counts"]["failed"] == 1 and status["counts"]["never_started"] == 3 - committed
    assert "out of memory" in json.dumps(status["shards"]["failed"])  # with the tail of its log
    monkeypatch.setattr(shard_module, "capture", real_capture)
    assert extract(config).totals.shards == 4 - committed  # the failed shard and those never started
    assert open_store(store_path).summary()["complete"]


def test_resuming_against_a_different_plan_or_config_is_refused_naming_the_difference(extract_config):
    from probecache.extract.errors import ExtractError

    config = extract_config()
    store = open_store(extract(config).store_path)
    store.layout.part(3).unlink()  # an unfinished store, so the rerun has to resume
    plan = pq.read_table(store.layout.plan)
    tampered = plan.set_column(3, "n_tokens", pa.array([n + 1 for n in plan["n_tokens"].to_pylist()], pa.int32()))
    store.layout.plan.chmod(0o644)
    pq.write_table(tampered, store.layout.plan)
    with pytest.raises(ExtractError, match="column 'n_tokens' differs"):
        extract(config)
    pq.write_table(plan, store.layout.plan)
    info = json.loads(store.layout.store_json.read_text())
    info["identity"]["max_tokens"] = 64  # a header that does not describe this extraction
    store.layout.store_json.write_text(json.dumps(info))
    with pytest.raises(StoreError, match=r"store.json is damaged"):  # a hand edit breaks the header's seal
        extract(config)
    # another extraction's sound header copied under this store's name: the identity comparison names the difference
    from probecache.store.header import seal_header
    from probecache.store.layout import store_id_for

    info["store_id"] = store_id_for(info["identity"], info["dataset"]["name"])
    store.layout.store_json.write_bytes(seal_header(info))
    with pytest.raises(ExtractError, match=r"differs in: max_tokens"):
        extract(config)
