"""The local launcher: resolve model and data, derive the store id, plan, and run the missing shards.

Same config -> same store id -> a complete store is a cache hit that writes nothing; a partial store
resumes with only its uncommitted shards (the plan is checked to be identical first).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pyarrow.parquet as pq
from probecache.store.codecs import logical_dtype_name
from probecache.store.commit import create_if_absent
from probecache.store.layout import FORMAT_VERSION, StoreLayout, store_id_for
from tqdm.auto import tqdm

from .config import ExtractConfig
from .datasets import Dataset, load_dataset
from .errors import ExtractError
from .models import ModelSource, load_model, resolve_device, resolve_dtype, resolve_model, tokenizer_identity
from .plan import make_plan, plan_bytes, plan_digest, plan_table, select_examples
from .shard import ExtractionJob, RunTotals, run_shard
from .writer import BackgroundWriter


@dataclass(frozen=True)
class ExtractResult:
    store_path: Path
    store_id: str
    cache_hit: bool  # True when every shard was already committed: nothing was computed or written
    shards_run: int
    shards_total: int
    totals: RunTotals  # what this run committed
    forward_seconds: float  # inside the model's forward passes
    loop_seconds: float  # from the first forward to the last commit (what forward_seconds is compared to)
    wall_seconds: float  # everything, model and data loading included


def _log(config: ExtractConfig, message: str) -> None:
    if config.progress:
        print(message, file=sys.stderr)


def identity_of(config: ExtractConfig, source: ModelSource, tokenizer, dataset: Dataset, dtype_name: str) -> dict:
    """Every field that changes stored bytes, and nothing else (hardware and versions are provenance)."""
    return {
        "model_weights": source.weights_id,
        "dtype": dtype_name,
        **tokenizer_identity(source, tokenizer),
        "prompt_format": config.prompt_format,
        "max_tokens": config.max_tokens,
        "truncation_side": config.truncation_side,
        "padding_side": "right",
        "layers": "all",
        "capture": _capture(config),
        "mantissa_bits": config.mantissa_bits,
        "dataset_fingerprint": dataset.fingerprint(),
        "limit": config.limit,
        "limit_seed": config.seed if config.limit else None,
        "shard_size": config.shard_size,
    }


def _capture(config: ExtractConfig) -> dict:
    return {"hidden": True, "mean": True, "last": True, "logits": config.logits, "text": config.store_text}


def extract(config: ExtractConfig) -> ExtractResult:
    config.validate()
    started = time.time()
    dataset = load_dataset(
        config.dataset, list(config.splits) if config.splits else None, data_dir=config.data_dir,
        text_col=config.text_col, label_col=config.label_col, id_col=config.id_col, strict=config.strict,
        validation_fraction=config.validation_fraction, seed=config.seed,
    )
    _report_bad_rows(config, dataset)
    source = resolve_model(config.model)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=False)
    model_config = AutoConfig.from_pretrained(source.path, trust_remote_code=False)
    dtype_name = logical_dtype_name(dtype)
    if config.mantissa_bits is not None and dtype_name != "bfloat16":
        raise ExtractError("--mantissa-bits rounds bf16 values: use it with --dtype bf16 (or auto)")
    identity = identity_of(config, source, tokenizer, dataset, dtype_name)
    store_id = store_id_for(identity, dataset.name)
    layout = StoreLayout(Path(config.root).expanduser() / store_id)

    if layout.store_json.is_file():
        info = json.loads(layout.store_json.read_text())
        if info.get("identity") != identity:  # only a hash collision or a hand-edited store gets here
            raise ExtractError(f"{layout.path} holds a different extraction: move it away or use another --root")
        if len(layout.committed_shards()) == info["plan"]["n_shards"]:
            _log(config, f"already extracted: {layout.path} ({info['plan']['n_examples']} examples); nothing to do")
            return ExtractResult(layout.path, store_id, True, 0, info["plan"]["n_shards"], RunTotals(), 0.0,
                                 0.0, time.time() - started)

    examples = select_examples(dataset.splits, config.limit, config.seed)
    if not examples:
        raise ExtractError(f"{dataset.name}: no examples left to extract (check --split and bad-row report)")
    plan = make_plan(examples, tokenizer, config)
    table = plan_table(plan)
    digest = plan_digest(table)
    n_shards = plan[-1].shard_id + 1
    _write_store_header(layout, config, store_id, identity, source, model_config, dataset, dtype_name,
                        table, digest, n_shards, device)

    todo = sorted(set(range(n_shards)) - layout.committed_shards())
    truncated = sum(p.n_tokens < p.n_tokens_original for p in plan)
    _log(config, f"store {store_id}: {len(plan)} examples in {n_shards} shards, {len(todo)} to extract"
                 f"{f', {truncated} truncated to {config.max_tokens} tokens' if truncated else ''}")
    model, _ = load_model(source, dtype, device)
    by_shard: dict[int, list] = {}
    for p in plan:
        by_shard.setdefault(p.shard_id, []).append(p)
    writer = BackgroundWriter()
    job = ExtractionJob(
        config=config, layout=layout, store_id=store_id, dataset_name=dataset.name,
        label_names=list(dataset.label_names), plan_by_shard=by_shard, model=model,
        pad_id=_pad_id(tokenizer), logical_dtype=dtype_name,
        n_layers=model_config.num_hidden_layers + 1, hidden_size=model_config.hidden_size,
        vocab_size=model_config.vocab_size, writer=writer,
    )
    todo_examples = sum(len(by_shard[s]) for s in todo)
    with tqdm(total=todo_examples, unit="ex", disable=not config.progress, dynamic_ncols=True) as bar:
        tokens_seen = [0]

        def on_batch(batch) -> None:
            tokens_seen[0] += sum(p.n_tokens for p in batch)
            elapsed = max(bar.format_dict["elapsed"], 1e-9)
            t = job.totals
            ratio = f"{t.compression():.2f}x" if t.compression() else "-"
            written = (t.bytes_stored + t.in_progress_bytes) / 1e6
            bar.set_postfix_str(f"{tokens_seen[0] / elapsed:,.0f} tok/s, {written:,.1f} MB written, "
                                f"compression {ratio}", refresh=False)
            bar.update(len(batch))

        loop_started = time.perf_counter()
        try:
            for shard_id in todo:
                run_shard(job, shard_id, on_batch=on_batch)
            writer.drain()
        finally:
            writer.close()
        loop_seconds = time.perf_counter() - loop_started
    result = ExtractResult(layout.path, store_id, False, len(todo), n_shards, job.totals,
                           job.forward_seconds, loop_seconds, time.time() - started)
    _log(config, _summary(result))
    return result


def _pad_id(tokenizer) -> int:
    """Any id works for padding (masked and stripped); prefer the tokenizer's own pad, then eos."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def _report_bad_rows(config: ExtractConfig, dataset: Dataset) -> None:
    if not dataset.bad_rows:
        return
    reasons: dict[str, list[str]] = {}
    for bad in dataset.bad_rows:
        reasons.setdefault(bad.reason, []).append(bad.example_id)
    detail = "; ".join(f"{len(ids)} {reason} ({', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''})"
                       for reason, ids in reasons.items())
    _log(config, f"warning: {dataset.name}: excluded {len(dataset.bad_rows)} bad rows: {detail} "
                 f"(--strict makes this an error)")


def _write_store_header(layout, config, store_id, identity, source, model_config, dataset, dtype_name,
                        table, digest, n_shards, device) -> None:
    """plan.parquet then store.json, both create-if-absent; an existing plan must match ours exactly."""
    if not create_if_absent(layout.plan, plan_bytes(table)):
        existing = plan_digest(pq.read_table(layout.plan))
        if existing != digest:
            raise ExtractError(f"{layout.plan} differs from this run's plan (the tokenizer or data changed "
                               "under the same identity): move the store away and extract again")
    header = {
        "format_version": FORMAT_VERSION,
        "store_id": store_id,
        "identity": identity,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "logical_dtype": dtype_name,
        "capture": _capture(config),
        "model": {
            "name": source.name, "kind": source.kind, "weights_id": source.weights_id,
            "architecture": (model_config.architectures or ["?"])[0], "model_type": model_config.model_type,
            "n_layers": model_config.num_hidden_layers + 1, "hidden_size": model_config.hidden_size,
            "vocab_size": model_config.vocab_size,
        },
        "dataset": {
            "name": dataset.name, "fingerprint": dataset.fingerprint(), "source": dataset.source,
            "label_names": list(dataset.label_names), "multilabel_names": list(dataset.multilabel_names),
            "split_sizes": {s: int((table["split"].to_numpy(zero_copy_only=False) == s).sum())
                            for s in dataset.splits},
            "bad_rows": len(dataset.bad_rows),
        },
        "plan": {"sha256": digest, "n_examples": table.num_rows, "n_shards": n_shards,
                 "n_tokens": int(sum(table["n_tokens"].to_pylist())), "shard_size": config.shard_size},
        "provenance": {
            "probecache": _version("probecache"), "torch": _version("torch"),
            "transformers": _version("transformers"), "zarr": _version("zarr"),
            "python": platform.python_version(), "device": device,
            "extract_options": {"batch_tokens": config.batch_tokens, "max_batch_size": config.max_batch_size},
        },
    }
    create_if_absent(layout.store_json, json.dumps(header, indent=1).encode())


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _summary(r: ExtractResult) -> str:
    t = r.totals
    if not t.examples:
        return f"done: {r.store_path} (no new shards)"
    return (f"done: {t.examples:,} examples, {t.tokens:,} tokens in {r.loop_seconds:.1f} s "
            f"({t.tokens / max(r.loop_seconds, 1e-9):,.0f} tok/s, forward passes {r.forward_seconds:.1f} s); "
            f"{t.bytes_stored / 1e6:,.1f} MB stored, activations compressed "
            f"{t.hidden_bytes_raw / t.hidden_bytes_stored:.2f}x, padding {1 - t.tokens / t.padded_tokens:.1%} "
            "of processed tokens")
