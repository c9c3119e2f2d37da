"""Everything before the first forward pass: data, tokenizer, identity, the frozen plan, the store header.

Cheap and model-free (the tokenizer and config only), so every launcher runs it: the local loop, each SLURM
array task and the dask driver all derive the same store id and the same plan from the same config, and a
task refuses to work on a store whose plan differs from its own.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata

import pyarrow as pa
import pyarrow.parquet as pq
from probecache.lm.models import ModelSource, resolve_device, resolve_dtype, resolve_model, tokenizer_identity
from probecache.store.codecs import logical_dtype_name
from probecache.store.commit import create_if_absent
from probecache.store.faults import crash_point
from probecache.store.header import read_header, seal_header
from probecache.store.layout import FORMAT_VERSION, StoreLayout, store_id_for
from probecache.store.remote import store_root
from probecache.store.tiers import with_tier

from .config import ExtractConfig
from .datasets import Dataset, load_dataset
from .errors import ExtractError
from .plan import PlannedExample, make_plan, plan_bytes, plan_digest, plan_table, select_examples


def log(config: ExtractConfig, message: str) -> None:
    if config.progress:
        print(message, file=sys.stderr)


@dataclass
class PreparedStore:
    """A config resolved against its data and model files; nothing written yet."""

    config: ExtractConfig
    dataset: Dataset
    source: ModelSource
    device: str
    dtype_name: str
    tokenizer: object
    model_config: object
    identity: dict
    store_id: str
    layout: StoreLayout
    plan: list[PlannedExample] = field(default_factory=list)  # filled by freeze_plan()

    @property
    def n_shards(self) -> int:
        return self.plan[-1].shard_id + 1

    def by_shard(self) -> dict[int, list[PlannedExample]]:
        out: dict[int, list[PlannedExample]] = {}
        for p in self.plan:
            out.setdefault(p.shard_id, []).append(p)
        return out

    def stored_info(self) -> dict | None:
        """store.json of an existing store at this id (checked to hold this very extraction)."""
        if not self.layout.store_json.is_file():
            return None
        info = read_header(self.layout.path)
        if info.get("identity") != self.identity:  # only a hash collision or a hand-edited store gets here
            differs = sorted(k for k in {*info.get("identity", {}), *self.identity}
                             if info.get("identity", {}).get(k) != self.identity.get(k))
            raise ExtractError(f"{self.layout.path} holds a different extraction (differs in: "
                               f"{', '.join(differs)}): move it away or use another --root")
        return info


def prepare(config: ExtractConfig) -> PreparedStore:
    config.validate()
    dataset = load_dataset(
        config.dataset, list(config.splits) if config.splits else None, data_dir=config.data_dir,
        text_col=config.text_col, label_col=config.label_col, id_col=config.id_col, strict=config.strict,
        validation_fraction=config.validation_fraction, seed=config.seed,
    )
    _report_bad_rows(config, dataset)
    source = resolve_model(config.model)
    device = resolve_device(config.device)
    dtype_name = logical_dtype_name(resolve_dtype(config.dtype, device))
    if config.value_tier().kind == "mantissa" and dtype_name != "bfloat16":
        raise ExtractError("--tier mantissa-K (--mantissa-bits) rounds bf16 values: use it with --dtype bf16 (or auto)")
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=False)
    model_config = AutoConfig.from_pretrained(source.path, trust_remote_code=False)
    identity = identity_of(config, source, tokenizer, dataset, dtype_name, model_config.num_hidden_layers + 1)
    store_id = store_id_for(identity, dataset.name)
    layout = StoreLayout(store_root(config.root) / store_id)  # a URL root: its local staging folder
    return PreparedStore(config, dataset, source, device, dtype_name, tokenizer, model_config, identity,
                         store_id, layout)


def freeze_plan(prep: PreparedStore, write: bool = True) -> None:
    """Tokenize and shard; write plan.parquet and store.json (create-if-absent) or check they match.

    ``write=False`` (dry runs) only computes the plan."""
    examples = select_examples(prep.dataset.splits, prep.config.limit, prep.config.seed)
    if not examples:
        raise ExtractError(f"{prep.dataset.name}: no examples left to extract (check --split and bad rows)")
    prep.plan = make_plan(examples, prep.tokenizer, prep.config)
    if write:
        table = plan_table(prep.plan)
        _write_store_header(prep, table, plan_digest(table))


def identity_of(config: ExtractConfig, source: ModelSource, tokenizer, dataset: Dataset, dtype_name: str,
                n_layers: int) -> dict:
    """Every field that changes stored bytes, and nothing else (hardware and versions are provenance).
    ``n_layers``: the model's L+1 hidden-state layers (what --layers selects from)."""
    tier = config.value_tier()
    layers = config.stored_layers(n_layers)
    identity = {
        "model_weights": source.weights_id,
        "dtype": dtype_name,
        **tokenizer_identity(source, tokenizer),
        "prompt_format": config.prompt_format,
        "max_tokens": config.max_tokens,
        "truncation_side": config.truncation_side,
        "padding_side": "right",
        # the model layers kept, in order (--layers); "all" keeps the ids of stores from before layer subsets
        "layers": "all" if layers == list(range(n_layers)) else layers,
        "capture": _capture(config),
        "mantissa_bits": None,  # set by with_tier below
        "dataset_fingerprint": dataset.fingerprint(),
        "limit": config.limit,
        "limit_seed": config.seed if config.limit else None,
        # how --limit samples (extract/plan.py select_examples): a new method is a new store id, never a store
        # whose id no longer says which examples it holds
        "limit_sampling": "per-split-label-salted" if config.limit else None,
        "shard_size": config.shard_size,
    }
    return with_tier(identity, tier)  # the one tier rule, shared with `store convert`


def _capture(config: ExtractConfig) -> dict:
    capture = {"hidden": True, "mean": True, "last": True, "logits": config.logits, "text": config.store_text}
    if config.store_token_ids:  # only when on: stores extracted without it keep their store id
        capture["token_ids"] = True
    if not config.token_policy().keeps_all:  # likewise: "all" is the absence of the key
        capture["tokens"] = config.token_policy().name
    if config.share_prefixes:  # likewise: stores without it keep their id
        capture["shared_prefixes"] = True
    return capture


def _report_bad_rows(config: ExtractConfig, dataset: Dataset) -> None:
    if not dataset.bad_rows:
        return
    reasons: dict[str, list[str]] = {}
    for bad in dataset.bad_rows:
        reasons.setdefault(bad.reason, []).append(bad.example_id)
    detail = "; ".join(f"{len(ids)} {reason} ({', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''})"
                       for reason, ids in reasons.items())
    log(config, f"warning: {dataset.name}: excluded {len(dataset.bad_rows)} bad rows: {detail} "
                 f"(--strict makes this an error)")


def _write_store_header(prep: PreparedStore, table: pa.Table, digest: str) -> None:
    """plan.parquet then store.json, both create-if-absent; an existing plan must match ours exactly."""
    config, layout, source, dataset = prep.config, prep.layout, prep.source, prep.dataset
    model_config = prep.model_config
    if not create_if_absent(layout.plan, plan_bytes(table)):
        existing = pq.read_table(layout.plan)
        if plan_digest(existing) != digest:
            raise ExtractError(f"{layout.plan} differs from this run's plan ({_first_difference(existing, table)}; "
                               "the tokenizer or data changed under the same identity): move the store away")
    crash_point("plan-written")
    header = {
        "format_version": FORMAT_VERSION,
        "store_id": prep.store_id,
        "identity": prep.identity,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "logical_dtype": prep.dtype_name,
        "tier": config.value_tier().name,  # how hidden is stored (store/tiers.py); absent in older stores
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
        "plan": {"sha256": digest, "n_examples": table.num_rows, "n_shards": prep.n_shards,
                 "n_tokens": int(sum(table["n_tokens"].to_pylist())), "shard_size": config.shard_size},
        "provenance": {
            "probecache": _version("probecache"), "torch": _version("torch"),
            "transformers": _version("transformers"), "zarr": _version("zarr"),
            "python": platform.python_version(), "device": prep.device,
            "extract_config": asdict(config),  # the command that made it (paths included)
        },
    }
    # manifests/ exists from the start: a store whose manifests/ folder is gone is damaged, never "empty"
    layout.manifests.mkdir(parents=True, exist_ok=True)
    create_if_absent(layout.store_json, seal_header(header))
    crash_point("header-written")


def _first_difference(old: pa.Table, new: pa.Table) -> str:
    if old.num_rows != new.num_rows:
        return f"{old.num_rows} examples stored vs {new.num_rows} now"
    for column in new.column_names:
        if column not in old.column_names or old[column] != new[column]:
            return f"column {column!r} differs"
    return "content differs"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
