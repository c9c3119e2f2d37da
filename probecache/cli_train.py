"""`probecache train`, `probecache eval` and `probecache report`: probes from a store, without the LLM.

No `from __future__ import annotations` here: typer evaluates the option annotations, and they name choices
imported inside `register` from train/choices.py, which imports nothing heavy; the train stage itself (torch,
scikit-learn, zarr) loads only when a command runs, so `--help` stays fast.
"""


import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from probecache.cli_common import CliError, DeviceOpt, JsonOpt, StoreRootOpt, fail, print_table, user_errors

_PROBE = "Probe"
_TRAIN = "Training (repeat an option to sweep it)"
_BASE = "Baselines (linear, muli, tfidf)"
_DATA = "Data"
_OUT = "Output"
_RUN = "Where the sweep runs"


def parse_layers(spec: str | None, n_layers: int) -> list[int] | None:
    """--layers in the one layer grammar (store/layers.py: '0-4,10,-1', '20--1'); None or 'all': every layer."""
    from probecache.store.layers import LayerSelectionError, select_layers

    if spec is None or spec.strip().lower() == "all":
        return None
    try:
        return select_layers(spec, n_layers)
    except LayerSelectionError as e:
        raise LayerSelectionError(f"--{e}") from None


def open_store_arg(store: str, root: str | None):
    """A store folder or URL, or a store id under --root / $PROBECACHE_ROOT (a folder or a URL)."""
    from probecache.extract.config import default_root
    from probecache.store.reader import open_store
    from probecache.store.remote import is_remote, root_text

    # both through parse_root (store/remote.py): a URL in any case or slash count is read as the URL it is, one
    # with credentials is refused, and neither is ever looked up as a local folder
    store = root_text(store)
    if is_remote(store):
        return open_store(store)
    base = root_text(root or default_root())
    if is_remote(base) and "/" not in store:
        return open_store(f"{base}/{store}")

    path = Path(store).expanduser()
    if not (path / "store.json").is_file() and not path.is_absolute() and "/" not in store:
        candidate = Path(base).expanduser() / store
        if (candidate / "store.json").is_file():
            path = candidate
    return open_store(path)


def _fmt(m: dict | None, name: str) -> str:
    if m is None or m.get(name) is None:
        return "—"
    return f"{m[name]:.3f}"


def register(app: typer.Typer) -> None:
    # the option vocabularies only (no torch, numpy or zarr): the train stage itself loads when a command runs
    from probecache.train.choices import ALL_PROBES, CLASS_WEIGHTS, METRICS, NORMS, POOLS, READOUTS, default_runs_dir
    from probecache.train.options import EXECUTORS, Grid, TrainOptions  # the defaults below are theirs

    @app.command(epilog="Examples:\n\n  probecache train --store stores/rotten_tomatoes-XXXX --probe scoring\n\n"
                        "  probecache train --store STORE --probe mha --downcast 8 --downcast 32 --lr 1e-4 --lr 3e-4 "
                        "--seeds 3\n\n  probecache train --store STORE --probe linear   (per-layer curve)")
    def train(
        store: Annotated[str, typer.Option(help="Store folder (printed as `store: ...` by extract), or a store id "
                                                "under --root.", rich_help_panel=_DATA)],
        probe: Annotated[str, typer.Option(help=f"One of {', '.join(ALL_PROBES)}.", rich_help_panel=_PROBE)],
        pool: Annotated[list[str], typer.Option(help=f"pooling / mha: {' or '.join(POOLS)} pooling.",
                                                rich_help_panel=_PROBE)] = list(Grid.pools),  # noqa: B006
        norm: Annotated[list[str], typer.Option(help=f"{' or '.join(NORMS)}: rms scales every token vector to unit "
                                                     "RMS before stage 1 (tames massive activations; none = the "
                                                     "paper's raw states).", rich_help_panel=_PROBE)
                        ] = list(Grid.norms),  # noqa: B006
        downcast: Annotated[list[int], typer.Option(help="mha: d_inner = hidden size / downcast.",
                                                    rich_help_panel=_PROBE)] = list(Grid.downcasts),  # noqa: B006
        heads: Annotated[list[int], typer.Option(help="mha: attention heads \\[default: 8, or the most of 4/2/1 that "
                                                      "divide d_inner].", rich_help_panel=_PROBE,
                                                 show_default=False)] = [],  # noqa: B006
        layers: Annotated[str | None, typer.Option(help="Layer subset, e.g. 0-4,20,-1 (0 = embedding output) "
                                                        "\\[default: all].", rich_help_panel=_PROBE)] = None,
        lr: Annotated[list[float], typer.Option(help="AdamW learning rate \\[default: pooling 1e-2, scoring 3e-3, "
                                                     "mha 1e-3].", rich_help_panel=_TRAIN, show_default=False)
                      ] = [],  # noqa: B006
        weight_decay: Annotated[list[float], typer.Option(rich_help_panel=_TRAIN)] = list(Grid.weight_decays),  # noqa: B006
        batch_size: Annotated[list[int], typer.Option(rich_help_panel=_TRAIN)] = list(Grid.batch_sizes),  # noqa: B006
        class_weight: Annotated[list[str], typer.Option(help=f"{' or '.join(CLASS_WEIGHTS)} (balanced: inverse "
                                                             "class frequency).", rich_help_panel=_TRAIN)
                                ] = list(Grid.class_weights),  # noqa: B006
        epochs: Annotated[int, typer.Option(help="At most this many epochs.", rich_help_panel=_TRAIN)] = Grid.epochs,
        patience: Annotated[int, typer.Option(help="Stop after this many epochs without a better validation "
                                                   "metric.", rich_help_panel=_TRAIN)] = Grid.patience,
        seeds: Annotated[int, typer.Option(help="Seeds per configuration (0..N-1): results are mean ± std.",
                                           rich_help_panel=_TRAIN)] = 1,
        metric: Annotated[str | None, typer.Option(help=f"Selection metric: {' or '.join(METRICS)} \\[default: f1 "
                                                        "for toxic/harm/unsafe labels, else accuracy].",
                                                   rich_help_panel=_TRAIN)] = None,
        c: Annotated[list[float], typer.Option("--C", help="Inverse L2/L1 strength, chosen on validation "
                                                           "\\[default: linear 1; muli 0.01..10; tfidf 0.1..10].",
                                               rich_help_panel=_BASE, show_default=False)] = [],  # noqa: B006
        readout: Annotated[str, typer.Option(help=f"linear: {' or '.join(READOUTS)} state per layer.",
                                             rich_help_panel=_BASE)] = TrainOptions.readout,
        root: Annotated[str | None, typer.Option(help="Where store ids are looked up \\[default: $PROBECACHE_ROOT "
                                                      "or stores].", rich_help_panel=_DATA)] = None,
        train_split: Annotated[str, typer.Option(rich_help_panel=_DATA)] = TrainOptions.train_split,
        validation_split: Annotated[str, typer.Option(help="Carved from train (stratified) when the store has "
                                                           "none.", rich_help_panel=_DATA)
                                    ] = TrainOptions.validation_split,
        test_split: Annotated[str, typer.Option(help="Read once, for the selected configuration; 'none' skips "
                                                     "it.", rich_help_panel=_DATA)] = TrainOptions.test_split,
        validation_fraction: Annotated[float, typer.Option(rich_help_panel=_DATA)] = TrainOptions.validation_fraction,
        buffer_tokens: Annotated[int, typer.Option(help="Shuffle buffer bound (tokens): memory = tokens x layers x "
                                                        "d x 2 B.", rich_help_panel=_DATA)
                                 ] = TrainOptions.buffer_tokens,
        decoded_cache: Annotated[str | None, typer.Option(
            help="Keep an uncompressed local copy of the blocks this run reads (its layers only), up to this size "
                 "(500M, 20G): later epochs and later runs on the same layers copy them instead of decoding zstd. "
                 "Checked on every read, least recently used evicted; `probecache store decoded-cache` shows or "
                 "clears it. \\[default: none]", rich_help_panel=_DATA, show_default=False)] = None,
        decoded_cache_dir: Annotated[str | None, typer.Option(
            help="Folder of --decoded-cache \\[default: $PROBECACHE_CACHE/decoded].", rich_help_panel=_DATA,
            show_default=False)] = None,
        runs_dir: Annotated[str, typer.Option(help="Where run folders go \\[default: $PROBECACHE_RUNS or runs].",
                                              rich_help_panel=_OUT, show_default=False)] = "",
        device: Annotated[str, typer.Option(help="cpu | cuda[:N] | mps | auto.", rich_help_panel=_OUT)
                          ] = TrainOptions.device,
        progress: Annotated[bool, typer.Option(help="Progress bars on stderr.", rich_help_panel=_OUT)
                            ] = TrainOptions.progress,
        executor: Annotated[str, typer.Option(help=f"{' or '.join(EXECUTORS)}: dask fits a probe sweep's variants "
                                                   "in --workers shares on a dask cluster (same results).",
                                              rich_help_panel=_RUN)] = TrainOptions.executor,
        workers: Annotated[int, typer.Option(help="dask: shares of the sweep (and LocalCluster worker processes).",
                                             rich_help_panel=_RUN)] = TrainOptions.workers,
        scheduler: Annotated[str | None, typer.Option(help="dask: a running scheduler's address (tcp://host:8786), "
                                                           "or slurm: --workers SLURM jobs (dask-jobqueue) "
                                                           "\\[default: a LocalCluster].", rich_help_panel=_RUN,
                                                      show_default=False)] = TrainOptions.scheduler,
        partition: Annotated[str | None, typer.Option(help="--scheduler slurm: the jobs' partition.",
                                                      rich_help_panel=_RUN, show_default=False)] = None,
        time_limit: Annotated[str | None, typer.Option("--time", help="--scheduler slurm: each job's time limit "
                                                       "\\[default: 01:00:00].", rich_help_panel=_RUN,
                                                       show_default=False)] = None,
        cpus_per_task: Annotated[int | None, typer.Option(help="--scheduler slurm: each job's CPUs; a task runs "
                                                               "as many torch threads as this process, whatever it "
                                                               "gets \\[default: 1].", rich_help_panel=_RUN,
                                                          show_default=False)] = None,
        mem: Annotated[str | None, typer.Option(help="--scheduler slurm: each job's memory, e.g. 16GB "
                                                     "\\[default: 4GB].", rich_help_panel=_RUN,
                                                show_default=False)] = None,
    ) -> None:
        """Train a probe (or a sweep of them, reading each batch once) on a store; select on validation, test once.

        Writes runs/<id>/ (config.json, metrics.json, probe.safetensors, results.md, plots/) and prints
        `run: <path>` last.
        """
        from probecache.cluster.dask_clusters import SlurmResources
        from probecache.train.runner import train_run

        try:
            st = open_store_arg(store, root)
            grid = Grid(probe, pools=pool, norms=norm, downcasts=downcast, heads=heads or [None], lrs=lr,
                        weight_decays=weight_decay, batch_sizes=batch_size, class_weights=class_weight,
                        seeds=list(range(seeds)), epochs=epochs, patience=patience)
            if seeds < 1:
                raise CliError(f"--seeds must be at least 1, got {seeds}")
            if metric is not None and metric not in METRICS:
                raise CliError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
            if len(class_weight) != 1 and probe in ("linear", "muli", "tfidf"):
                raise CliError(f"--probe {probe} (a baseline) takes a single --class-weight, got {len(class_weight)}")
            slurm = SlurmResources(partition=partition, time_limit=time_limit, cpus_per_task=cpus_per_task, mem=mem)
            options = TrainOptions(probe=probe, grid=grid, cs=tuple(c) or None, readout=readout,
                                   class_weight=class_weight[0], layers=parse_layers(layers, st.n_layers),
                                   metric=metric, train_split=train_split, validation_split=validation_split,
                                   test_split=None if test_split.lower() == "none" else test_split,
                                   validation_fraction=validation_fraction, runs_dir=runs_dir or default_runs_dir(),
                                   device=device, buffer_tokens=buffer_tokens, progress=progress,
                                   executor=executor, workers=workers, scheduler=scheduler,
                                   slurm=slurm,
                                   decoded_cache=decoded_cache, decoded_cache_dir=decoded_cache_dir,
                                   extra={"argv": sys.argv[1:]})
            run_dir = train_run(st, options)
        except user_errors() as e:
            fail(e)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        results = (run_dir / "results.md").read_text()
        typer.echo(results.rstrip())
        val, tst = metrics["validation"], metrics["test"]
        name = metrics["metric"]
        typer.echo(f"saved probe: validation {name} {_fmt(val, name)}, test {name} {_fmt(tst, name)} "
                   f"(threshold tuned on validation; at 0.5: {_fmt(tst and tst['at_0.5'], name)})")
        typer.echo(f"run: {run_dir.resolve()}")

    @app.command(name="eval")
    def eval_(
        run: Annotated[str, typer.Option(help="A run folder (printed as `run: ...` by train).")],
        store: Annotated[str, typer.Option(help="A store extracted with the same model (any dataset: "
                                                "out-of-distribution evaluation).")],
        split: Annotated[str, typer.Option(help="Split of the store to evaluate.")] = "test",
        root: StoreRootOpt = None,
        as_json: JsonOpt = False,
        device: DeviceOpt = TrainOptions.device,
    ) -> None:
        """Evaluate a trained probe on a split of a store (refuses stores of another model)."""
        from probecache.train.runner import evaluate_run

        try:
            metrics = evaluate_run(run, open_store_arg(store, root), split, device=device)
        except user_errors() as e:
            fail(e)
        if as_json:
            typer.echo(json.dumps(metrics))
            return
        rows = [["metric", f"threshold {metrics['threshold']:.3g}" if metrics["threshold"] is not None else "argmax",
                 "at 0.5"]]
        for name in ("accuracy", "f1", "macro_f1", "auroc", "auprc"):
            rows.append([name, _fmt(metrics, name), _fmt(metrics["at_0.5"], name)])
        print_table(rows)
        typer.echo(f"n = {metrics['n']}; confusion (rows = true class): {metrics['confusion']}")

    @app.command()
    def report(
        runs_dir: Annotated[str, typer.Option(help="Folder of runs \\[default: $PROBECACHE_RUNS or runs].",
                                              show_default=False)] = "",
        out: Annotated[str | None, typer.Option(help="Where report.md/.parquet/.png go \\[default: RUNS_DIR/report].")
                       ] = None,
    ) -> None:
        """The results table (Markdown + Parquet) and plots of every run."""
        from probecache.train.report import write_report

        try:
            paths = write_report(runs_dir or default_runs_dir(), out)
        except user_errors() as e:
            fail(e)
        except PermissionError as e:  # the output folder is the user's to fix; other OSErrors keep their traceback
            fail(CliError(f"cannot write the report to {e.filename}: permission denied; pass --out a writable folder"))
        for kind, path in paths.items():
            typer.echo(f"{kind}: {path}")
