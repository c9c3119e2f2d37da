"""One training run end to end (``probecache train``) and the evaluation of a saved run (``probecache eval``).

Probes (``pooling``, ``scoring``, ``mha``) go through :func:`probecache.train.sweep.run_sweep`. Baselines fit
scikit-learn logistic regressions (:mod:`probecache.train.baselines`) on the same splits:

- ``linear``: one probe per layer on the pooled tier (``--readout mean`` or ``last``); the layer with the best
  validation metric is selected and only it sees test. ``layer_curve.parquet`` holds the per-layer curve.
- ``muli``: L1-regularised logistic regression on the stored next-token logits (stores extracted with
  ``--logits``), C chosen on validation.
- ``tfidf``: word 1-2-gram TF-IDF + logistic regression on the raw text (stores extracted with
  ``--store-text``), C chosen on validation: the text-only reference, no LLM involved.

A run folder is complete once ``config.json`` and ``metrics.json`` exist (they are written last); a run that
fails removes its folder, so ``runs/`` never holds a half-written run.
"""

from __future__ import annotations

import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from probecache.lm.devices import resolve_device
from probecache.store.decoded_cache import DecodedCache, report_decoded_cache
from probecache.store.header import label_name_mismatch
from probecache.store.reader import Store

from . import baselines
from .choices import ALL_PROBES, BASELINES, CLASS_WEIGHTS, READOUTS  # noqa: F401  (defined there: the CLI's --help names them)
from .data import Splits, SplitSpec, batch_source, resolve_splits, split_counts, split_examples, uses_pooled_tier
from .errors import TrainError
from .loaders import load_pooled
from .metrics import metric_for
from .options import TrainOptions
from .probes import PROBES, check_safetensors, load_probe, save_probe
from .runs import (
    check_compatible,
    new_run_dir,
    read_json,
    store_provenance,
    write_json,
    write_layer_weights,
    write_metrics,
    write_results,
    write_scores,
)
from .sweep import Grid, expand_grid, run_sweep
from .trainer import evaluate, predict, select_threshold, variant_record

DEFAULT_CS = (0.01, 0.1, 1.0, 10.0)


def train_run(store: Store, options: TrainOptions) -> Path:
    """Train, select, test once, write ``runs/<id>/``; returns the run folder."""
    splits = resolve_splits(store, options.train_split, options.validation_split, options.test_split,
                            options.validation_fraction)
    metric = options.metric or metric_for(store.label_names)
    cache = DecodedCache.from_option(options.decoded_cache, options.decoded_cache_dir)
    before = store.decoded_cache  # this run's cache is this run's: the caller's store gets its own back after
    if cache is not None:
        store.decoded_cache = cache
    run_dir = new_run_dir(options.runs_dir, options.probe, store.info["dataset"]["name"])
    started = time.time()
    try:
        train = _train_probes if options.probe in PROBES else _train_baseline
        outcome = train(store, options, splits, metric, run_dir)
        config = {
            "run_id": run_dir.name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "kind": "probe" if options.probe in PROBES else options.probe, "probe": options.probe,
            "metric": metric, "selected": outcome.selected, "threshold": outcome.threshold,
            "store": store_provenance(store),
            "splits": {"train": splits.train.describe(), "validation": splits.validation.describe(),
                       "test": splits.test.describe() if splits.test else None},
            "layers": outcome.layers, "options": asdict(options),
            "seconds": round(time.time() - started, 2), **outcome.config,
        }
        if cache is not None:  # this process's reads; dask workers count their own
            config["decoded_cache"] = {"folder": str(cache.root), **asdict(cache.stats)}
            if options.progress:
                report_decoded_cache(cache)
        write_json(run_dir / "config.json", config)
        write_metrics(run_dir, metric, outcome.validation, outcome.test, outcome.seeds)  # last: marks it complete
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        store.decoded_cache = before
    try:
        from .plots import write_run_plots

        write_run_plots(run_dir)
    except Exception as e:  # a plot must never lose a trained run
        warnings.warn(f"plots for {run_dir.name} failed: {e}", stacklevel=2)
    return run_dir


@dataclass
class _Outcome:
    selected: dict  # the selected hyperparameters
    threshold: float | None  # the saved model's decision threshold (tuned on validation)
    layers: list[int]  # store layers the saved model reads
    validation: dict  # the saved model's metrics
    test: dict | None
    seeds: list[dict]  # {"seed", "validation", "test"} per seed of the selected configuration
    config: dict = field(default_factory=dict)  # extra config.json entries


def _train_probes(store: Store, options: TrainOptions, splits: Splits, metric: str, run_dir: Path) -> _Outcome:
    grid = options.grid or Grid(options.probe)
    layers = store.select_layers(options.layers)  # model layers; every layer the store holds by default
    variants = expand_grid(grid, len(layers), store.hidden_size, len(store.label_names))
    tokens = _tokens_read(store, variants)
    sweep = run_sweep(store, variants, splits, metric, layers=layers, device=options.device,
                      buffer_tokens=options.buffer_tokens, data_seed=grid.seeds[0], progress=options.progress,
                      executor=options.executor, workers=options.workers, scheduler=options.scheduler,
                      slurm=replace(options.slurm, log_directory=options.slurm.log_directory
                                    or str(Path(options.runs_dir) / "logs")))  # SLURM jobs' output
    best = sweep.best
    save_probe(best.probe, best.variant.probe, run_dir / "probe.safetensors")
    write_scores(run_dir, sweep.scores)
    write_results(run_dir, sweep.rows, metric)
    if sweep.layer_weights is not None:
        write_layer_weights(run_dir, sweep.layer_weights, sweep.layer_weight_labels, layers)
    seeds = [{"seed": r.variant.train.seed, "validation": r.validation, "test": t}
             for r, t in zip(sweep.selected_results, sweep.test, strict=True)]
    best_index = sweep.selected_results.index(best)
    return _Outcome(selected=best.variant.hyperparameters(), threshold=best.threshold, layers=layers,
                    validation=best.validation, test=sweep.test[best_index], seeds=seeds,
                    config={"saved_seed": best.variant.train.seed,
                            # the token policy the saved probe read (serve masks to it); None: it read pooled means
                            "tokens": tokens if _reads_tokens(best.variant) else None,
                            "variants": [dict(variant_record(r), label=r.variant.label) for r in sweep.results]})


def _reads_tokens(variant) -> bool:
    """Whether a probe variant reads the token stream (not the stored pooled means)."""
    return not uses_pooled_tier(variant.probe.name, variant.probe.pool, variant.probe.norm)


def _tokens_read(store: Store, variants) -> str:
    """The token policy the token-reading variants will read (the store's): refused when the store keeps only the
    last token, where attention or max pooling over "the tokens" would silently be a last-token readout."""
    policy = store.token_policy
    reading = [v for v in variants if _reads_tokens(v)]
    if reading and policy.name == "last":
        v = reading[0].probe
        raise TrainError(f"store {store.store_id} keeps only each prompt's last token (extracted with --tokens last), "
                         f"but probe {v.name} (pool {v.pool}, norm {v.norm}) reads every token: re-extract with "
                         f"--tokens all (or last-N), or train --probe linear --readout last")
    return policy.name


# ---- baselines ----------------------------------------------------------------------------------------------

DEFAULT_BASELINE_CS = {"linear": (1.0,), "muli": DEFAULT_CS, "tfidf": (0.1, 1.0, 10.0)}


def _features(store: Store, probe: str, spec: SplitSpec, readout: str = "mean", layers: list[int] | None = None):
    """A baseline's inputs for a split: (features, labels, example ids). linear: (N, L', d) pooled states;
    muli: (N, V) float32 logits; tfidf: a list of texts."""
    ids, labels = split_examples(store, spec)
    if probe == "linear":
        data = load_pooled(store, spec.split, kind=readout, layers=layers, ids=spec.ids)
        return data.x.numpy(), data.y.numpy(), data.example_ids
    if probe == "muli":
        if not store.info["capture"].get("logits"):
            raise TrainError(f"store {store.store_id} has no logits: the muli baseline reads the next-token logits; "
                             f"re-extract with --logits")
        return store.logits(ids).to(torch.float32).numpy(), labels, ids
    if not store.info["capture"].get("text"):
        raise TrainError(f"store {store.store_id} holds no raw text (the default, for privacy): the tfidf baseline "
                         f"reads text; re-extract with --store-text")
    table = store.manifest(split=spec.split, columns=["example_id", "text"])
    text_of = dict(zip(table["example_id"].to_pylist(), table["text"].to_pylist(), strict=True))
    return [text_of[i] or "" for i in ids], labels, ids


def _predict_baseline(model, probe: str, x, layer_index: int | None = None) -> np.ndarray:
    if probe == "linear":
        x = x[:, layer_index]  # (N, d)
    return np.asarray(model.predict_proba(x), dtype=np.float64)


def _train_baseline(store: Store, options: TrainOptions, splits: Splits, metric: str, run_dir: Path) -> _Outcome:
    probe, n_classes = options.probe, len(store.label_names)
    cs = options.cs or DEFAULT_BASELINE_CS[probe]
    layers = store.select_layers(options.layers)
    x_tr, y_tr, _ = _features(store, probe, splits.train, options.readout, layers)
    x_val, y_val, val_ids = _features(store, probe, splits.validation, options.readout, layers)
    config: dict = {"cs": list(cs)}
    layer_index = None
    if probe == "linear":
        best_value, sweep = -np.inf, None
        for c in cs:  # one sweep over all layers per C; the (C, layer) pair with the best validation metric wins
            candidate = baselines.layer_sweep(x_tr, y_tr, x_val, y_val, layers, n_classes, metric=metric, C=c,
                                              class_weight=_cw(options), progress=options.progress)
            value = candidate.validation[candidate.best][metric]
            if value > best_value:
                best_value, sweep, best_c = value, candidate, c
        layer_index = sweep.best
        model = sweep.models[layer_index]
        selected = {"probe": "linear", "readout": options.readout, "layer": layers[layer_index], "C": best_c}
        curve = [{"layer": int(layer), **{m: sweep.validation[i][m] for m in ("accuracy", "f1", "macro_f1",
                                                                               "auroc", "auprc")},
                  "selected": i == layer_index} for i, layer in enumerate(layers)]
        pq.write_table(pa.Table.from_pylist(curve), run_dir / "layer_curve.parquet")
        saved_layers = [layers[layer_index]]
    else:
        select = baselines.select_C if probe == "muli" else baselines.select_tfidf_C
        kwargs = {"penalty": "l1"} if probe == "muli" else {}
        model, per_c = select(x_tr, y_tr, x_val, y_val, n_classes, Cs=cs, metric=metric, class_weight=_cw(options),
                              **kwargs)
        selected = {"probe": probe, "C": float(model.C if probe == "muli" else model.model.C)}
        config["per_C"] = per_c
        saved_layers = []
    val_scores = _predict_baseline(model, probe, x_val, layer_index)
    threshold = select_threshold(y_val, val_scores, metric)
    validation = evaluate(y_val, val_scores, threshold)
    scores = {"validation": (y_val, val_ids, val_scores)}
    test = None
    if splits.test is not None:  # the one read of test data, for the selected model only
        x_te, y_te, te_ids = _features(store, probe, splits.test, options.readout,
                                       saved_layers if probe == "linear" else None)
        te_scores = _predict_baseline(model, probe, x_te, 0 if probe == "linear" else None)
        test = evaluate(y_te, te_scores, threshold)
        scores["test"] = (y_te, te_ids, te_scores)
    model.save(run_dir / "probe.safetensors")
    write_scores(run_dir, scores)
    row = {"config": " ".join(f"{k}={v}" for k, v in selected.items()), "selected": True, "n_seeds": 1}
    write_results(run_dir, [row | _flat(validation, test)], metric)
    return _Outcome(selected=selected, threshold=threshold, layers=saved_layers, validation=validation, test=test,
                    seeds=[{"seed": 0, "validation": validation, "test": test}], config=config)


def _cw(options: TrainOptions) -> str | None:
    return None if options.class_weight == "none" else options.class_weight


def _flat(validation: dict, test: dict | None) -> dict:
    out = {}
    for split, m in (("validation", validation), ("test", test)):
        for name in ("accuracy", "f1", "macro_f1", "auroc", "auprc"):
            out[f"{split}_{name}_mean"] = None if m is None else m[name]
            out[f"{split}_{name}_std"] = None if m is None else 0.0
    return out


# ---- evaluation of a saved run --------------------------------------------------------------------------

def check_label_names(names: list[str], store: Store, run_id: str) -> None:
    """A run's label names must be the store's, position for position (labels are stored and predicted as indices,
    so another order, e.g. a swapped pair, inverts every label), and the store's store.json must agree with the
    label names its manifests recorded at extraction (an edited store.json is caught there)."""
    problem = label_names_problem(names, store.label_names, store.manifest(columns=["label", "label_name"]),
                                  store.store_id, run_id)
    if problem:
        message, whose = problem
        raise TrainError(message if whose == "store" else
                         f"{message}; evaluate on a store of the same task with the same label names")


def label_names_problem(names: list[str], have: list[str], manifest: pa.Table, store_id: str, run_id: str
                        ) -> tuple[str, str] | None:
    """Why run ``run_id`` (trained on ``names``) and a store (store.json's ``have``, ``manifest``'s label and
    label_name columns) disagree on what each label index means, and whose fault it is ("store": its store.json
    contradicts its own manifests, the message names the fix; "run": the run's names differ from a sound store's);
    None when they agree."""
    have = list(have)
    wrong = label_name_mismatch(have, manifest["label"].to_pylist(), manifest["label_name"].to_pylist())
    if wrong:
        label, name = wrong
        recorded = have[label] if 0 <= label < len(have) else None
        return (f"store {store_id}: store.json names label {label} {recorded!r} but its manifests recorded "
                f"{name!r} at extraction: store.json was edited; restore it or re-extract the store (a run "
                f"trained on it since has its labels wrong too)", "store")
    if list(names) != have:
        return (f"run {run_id} was trained on labels {list(names)} but store {store_id} has {have}: labels are "
                f"matched by position, so every label would be read as another", "run")
    return None


def evaluate_run(run_dir: str | Path, store: Store, split: str = "test", device: str = "cpu",
                 batch_size: int | None = None) -> dict:
    """The saved model of a run on one split of ``store`` (the same or another store of the same model), at the
    threshold tuned on the run's validation data; ``"at_0.5"`` inside.

    ``batch_size`` defaults to the run's own: padding never changes a score, but batch composition moves the
    last float bits, which can split ties and so AUROC/AUPRC; the run's batch size reproduces metrics.json."""
    device = resolve_device(device, TrainError)
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file() or not (run_dir / "probe.safetensors").is_file():
        raise TrainError(f"{run_dir} is not a complete probecache run (config.json and probe.safetensors): "
                         f"pass the folder printed as `run: ...` by probecache train")
    config = read_json(run_dir / "config.json")
    check_compatible(config, store)
    check_label_names(config["store"]["label_names"], store, config["run_id"])
    check_safetensors(run_dir / "probe.safetensors")
    counts = split_counts(store)
    if split not in counts:
        raise TrainError(f"store {store.store_id} has no committed {split!r} examples (it has: "
                         f"{', '.join(sorted(counts)) or 'none'}): pass --split")
    spec, probe, threshold = SplitSpec(split), config["probe"], config["threshold"]
    if probe in PROBES:
        model, probe_config = load_probe(run_dir / "probe.safetensors", device=device)
        batch_size = batch_size or config["selected"].get("batch_size", 32)
        source = batch_source(store, spec, probe_config, config["layers"], batch_size, False)
        pred = predict([model], source.epoch(0), device)
        labels, scores = pred.labels, pred.scores[0]
    else:
        kind = baselines.TfidfModel if probe == "tfidf" else baselines.LogisticModel
        model = kind.load(run_dir / "probe.safetensors")
        x, labels, _ = _features(store, probe, spec, config["selected"].get("readout", "mean"), config["layers"])
        scores = _predict_baseline(model, probe, x, 0 if probe == "linear" else None)
    out = evaluate(labels, scores, threshold)
    out |= {"run": config["run_id"], "store": store.store_id, "split": split}
    return out
