"""Run directories: what a training run leaves behind, and how it is loaded again for evaluation.

``runs/<run_id>/`` (run_id = ``<UTC time>-<probe>-<dataset>-<4 hex>``, created exclusively):

- ``config.json``: the run's options, the selected hyperparameters, and the store's provenance: store id and
  path, model name and weights id, tokenizer / chat-template hashes, prompt format, max tokens, dtype, and the
  exact manifest parts (file name, bytes, crc32c) the run read, so a later reader can tell whether the store
  it sees is the one the probe was trained on.
- ``metrics.json``: ``{"validation": M, "test": M | null, "metric", "seeds": [...], "summary": {...}}``. The
  top-level M are the *saved* probe's (the selected configuration's best-validation seed), at the threshold
  tuned on validation, with ``"at_0.5"`` inside; ``summary`` has mean and std over the selected configuration's
  seeds; ``seeds`` lists each one.
- ``probe.safetensors`` (no pickle), ``scores.parquet`` (split, example_id, label, score[_c]),
  ``results.parquet`` + ``results.md`` (one row per configuration), ``layer_weights.parquet`` (scoring) or
  ``layer_curve.parquet`` (linear), and ``plots/*.png``.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from probecache.manifests.schema import committed_part_files
from probecache.store.integrity import file_crc32c
from probecache.store.reader import Store

from .choices import DEFAULT_RUNS_DIR, default_runs_dir  # noqa: F401  (defined there: the CLI imports them light)
from .errors import TrainError

RUN_FILES = ("config.json", "metrics.json")


def new_run_dir(runs_dir: str | Path, probe: str, dataset: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", dataset.lower().rsplit("/", 1)[-1]).strip("-")[:40] or "data"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    root = Path(runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    while True:
        path = root / f"{stamp}-{probe}-{slug}-{secrets.token_hex(2)}"
        try:
            path.mkdir()  # exclusive: two runs started in the same second never share a folder
            return path
        except FileExistsError:
            continue


def store_provenance(store: Store) -> dict:
    info, model, identity = store.info, store.info["model"], store.info["identity"]
    parts = [{"name": p.name, "bytes": p.stat().st_size, "crc32c": file_crc32c(p)}
             for p in committed_part_files(store.layout.manifests)]
    return {
        "store_id": store.store_id, "path": str(getattr(store, "url", None) or store.path),
        "model": model["name"], "model_weights": model["weights_id"], "architecture": model.get("architecture"),
        "n_layers": store.n_layers, "hidden_size": store.hidden_size, "vocab_size": model.get("vocab_size"),
        "dtype": identity["dtype"], "prompt_format": identity["prompt_format"], "max_tokens": identity["max_tokens"],
        "truncation_side": identity.get("truncation_side"), "tokenizer_sha256": identity.get("tokenizer_sha256"),
        "chat_template_sha256": identity.get("chat_template_sha256"),
        "dataset": info["dataset"]["name"], "label_names": store.label_names, "manifest_parts": parts,
    }


def write_json(path: Path, obj: object) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    tmp.replace(path)  # a reader never sees half a file


def _json_default(obj: object):
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_scores(run_dir: Path, scores: dict[str, tuple[np.ndarray, list[str], np.ndarray]]) -> None:
    """``scores.parquet``: split, example_id, label, and score (binary) or score_0..score_{C-1}."""
    tables = []
    for split, (labels, ids, s) in scores.items():
        cols: dict = {"split": pa.array([split] * len(ids), pa.string()), "example_id": pa.array(ids, pa.string()),
                      "label": pa.array(np.asarray(labels, dtype=np.int64))}
        s = np.asarray(s, dtype=np.float64)
        if s.ndim == 1:
            cols["score"] = pa.array(s)
        else:
            cols |= {f"score_{c}": pa.array(s[:, c]) for c in range(s.shape[1])}
        tables.append(pa.table(cols))
    if tables:
        pq.write_table(pa.concat_tables(tables), run_dir / "scores.parquet")


def write_results(run_dir: Path, rows: list[dict], metric: str) -> None:
    """``results.parquet`` and ``results.md``: one row per configuration, mean ± std over its seeds."""
    pq.write_table(pa.Table.from_pylist(rows), run_dir / "results.parquet")
    (run_dir / "results.md").write_text(results_markdown(rows, metric))


def _cell(mean: float | None, std: float | None, percent: bool) -> str:
    if mean is None:
        return "—"
    if percent:
        return f"{100 * mean:.1f} ± {100 * (std or 0):.1f}"
    return f"{mean:.3f} ± {std or 0:.3f}"


def results_markdown(rows: list[dict], metric: str) -> str:
    names = [metric] + [m for m in ("accuracy", "f1", "auroc", "auprc") if m != metric]
    head = ["config", "seeds"] + [f"val {m}" for m in names] + [f"test {m}" for m in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        mark = " **(selected)**" if row["selected"] else ""
        cells = [f"`{row['config']}`{mark}", str(row["n_seeds"])]
        for split in ("validation", "test"):
            cells += [_cell(row[f"{split}_{m}_mean"], row[f"{split}_{m}_std"], m not in ("auroc", "auprc"))
                      for m in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_metrics(run_dir: Path, metric: str, validation: dict, test: dict | None, seeds: list[dict]) -> dict:
    from .sweep import summarize

    have_test = [s["test"] for s in seeds if s.get("test") is not None]
    metrics = {"validation": validation, "test": test, "metric": metric, "seeds": seeds,
               "summary": {"validation": summarize([s["validation"] for s in seeds]),
                           "test": summarize(have_test) if have_test else None}}
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def write_layer_weights(run_dir: Path, weights: np.ndarray, labels: np.ndarray, layers: list[int]) -> None:
    """Mean stage-2 weight per (true class, layer): the paper's layer-attention figure."""
    rows = []
    for cls in np.unique(labels):
        mean = weights[labels == cls].mean(axis=0)  # (L1,)
        rows += [{"class": int(cls), "layer": int(layer), "weight": float(w)}
                 for layer, w in zip(layers, mean, strict=True)]
    pq.write_table(pa.Table.from_pylist(rows), run_dir / "layer_weights.parquet")


def check_compatible(config: dict, store: Store) -> None:
    """Refuse a store whose inputs differ from the run's: another model (weights, width, depth), tokenizer, or
    prompt format (raw text vs chat template changes every hidden state). Another dataset or max_tokens is
    fine: that is out-of-distribution evaluation."""
    trained, identity = config["store"], store.info["identity"]
    problems = []
    for key, have in (("model_weights", store.info["model"]["weights_id"]), ("hidden_size", store.hidden_size),
                      ("n_layers", store.n_layers)):
        if trained.get(key) != have:
            problems.append(f"{key} {trained.get(key)} (run) vs {have} (store)")
    if problems:
        raise TrainError(f"store {store.store_id} was extracted with a different model than run "
                         f"{config['run_id']} ({'; '.join(problems)}): evaluate on a store extracted with "
                         f"--model {trained.get('model')}")
    if trained.get("tokenizer_sha256") not in (None, identity.get("tokenizer_sha256")):
        raise TrainError(f"store {store.store_id} was tokenised differently from run {config['run_id']}'s store: "
                         f"re-extract with the run's model ({trained.get('model')})")
    tokens = config.get("tokens")  # the token policy a token-reading probe was trained on (None: pooled/baseline)
    if tokens is not None and tokens != store.token_policy.name:
        raise TrainError(f"run {config['run_id']} read the tokens of a --tokens {tokens} store but store "
                         f"{store.store_id} keeps --tokens {store.token_policy.name}: the probe would attend over "
                         f"other tokens than it learnt on; evaluate on a store extracted with --tokens {tokens}")
    if trained.get("prompt_format") != identity.get("prompt_format"):
        raise TrainError(f"run {config['run_id']} was trained on --prompt-format {trained.get('prompt_format')} "
                         f"but store {store.store_id} holds --prompt-format {identity.get('prompt_format')}: "
                         f"re-extract with --prompt-format {trained.get('prompt_format')}")


def is_run_dir(path: Path) -> bool:
    return all((Path(path) / f).is_file() for f in RUN_FILES)
