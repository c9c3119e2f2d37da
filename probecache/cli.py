"""The `probecache` command line: thin typer wiring over the stages' Python API.

Every stage raises its own user-error types; here they become one line on stderr and exit code 2.
"""

from __future__ import annotations

import os

# Before torch loads its OpenMP runtime: extraction shares the cores between the forward pass and the
# background writer, and spinning OpenMP workers turn every writer time slice into a stalled forward.
# Passive waiting measured 1.05x extraction/forward vs 1.17x with spinning (bench/extract.py), and a
# faster extraction in absolute terms. An explicit OMP_WAIT_POLICY from the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Before pyarrow loads (it reads this once): Arrow's default mimalloc pool keeps what reading a manifest of many
# parts freed, the one part of training's peak RSS that grew with the store (+55 MB at 688 parts vs 43; x16
# peak 1.12x of x1). The system allocator hands it back: +6 MB (docs/BENCHMARKS.md, "Scale"). A user's wins.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

import errno  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from typing import Annotated  # noqa: E402

import typer  # noqa: E402

from probecache.cli_common import fail, print_table, user_errors  # noqa: E402

# The config dataclasses only (no torch, zarr or transformers), so that --help shows the
# defaults the stage itself uses. Everything heavy is imported inside the command bodies.
from probecache.extract.config import ExtractConfig, default_root  # noqa: E402
from probecache.extract.launchers import LaunchConfig  # noqa: E402

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1; rerun to resume

app = typer.Typer(
    help="Cache every token x layer hidden state of a frozen LLM once; train probes from the cache.\n\n"
    "Start with `probecache extract` (embedded SmolLM2 on Rotten Tomatoes, offline), then "
    "`probecache store info STORE`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from probecache import __version__

        typer.echo(f"probecache {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_version, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


@app.command()
def extract(
    dataset: Annotated[
        str,
        typer.Option(
            rich_help_panel="Data",
            help="Registry name (see `probecache datasets`) or csv:PATH, tsv:PATH, jsonl:PATH, parquet:PATH.",
        ),
    ] = ExtractConfig.dataset,
    split: Annotated[
        list[str] | None,
        typer.Option(
            rich_help_panel="Data",
            help="train / validation / test; repeat for several. Default: every split the source has.",
        ),
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            rich_help_panel="Model",
            help="smollm2-135m (embedded, offline), a local HF folder, a .gguf "
            "file, or a hub id org/name or org/name@revision.",
        ),
    ] = ExtractConfig.model,
    root: Annotated[
        str | None,
        typer.Option(rich_help_panel="Store", help="Folder holding stores (env PROBECACHE_ROOT; default ./stores)."),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            rich_help_panel="Data",
            help="Cap on examples in the store, spread over the splits in proportion (a deterministic sample).",
        ),
    ] = ExtractConfig.limit,
    data_dir: Annotated[
        str | None,
        typer.Option(
            rich_help_panel="Data",
            help="Folder with file-backed datasets (jigsaw_toxic/, sst2/, ...) (env PROBECACHE_DATA_DIR).",
        ),
    ] = ExtractConfig.data_dir,
    text_col: Annotated[
        str | None, typer.Option(rich_help_panel="Data", help="Text column of a csv:/jsonl:/parquet: file.")
    ] = ExtractConfig.text_col,
    label_col: Annotated[
        str | None, typer.Option(rich_help_panel="Data", help="Label column of a generic file.")
    ] = ExtractConfig.label_col,
    id_col: Annotated[
        str | None, typer.Option(rich_help_panel="Data", help="Id column of a generic file (default: id, else row).")
    ] = ExtractConfig.id_col,
    strict: Annotated[
        bool,
        typer.Option(
            rich_help_panel="Data",
            help="Bad rows (empty text, missing/unknown label, duplicate id) "
            "are an error instead of being excluded and reported.",
        ),
    ] = ExtractConfig.strict,
    dtype: Annotated[
        str, typer.Option(rich_help_panel="Model", help="auto | bf16 | fp16 | fp32 (auto = bf16 where fast).")
    ] = ExtractConfig.dtype,
    device: Annotated[str, typer.Option(rich_help_panel="Model", help="auto | cpu | cuda[:N].")] = ExtractConfig.device,
    prompt_format: Annotated[
        str,
        typer.Option(
            rich_help_panel="Model",
            help="raw text, or chat: the model's chat template with a "
            "generation prompt (what a served prompt looks like).",
        ),
    ] = ExtractConfig.prompt_format,
    max_tokens: Annotated[
        int, typer.Option(rich_help_panel="Model", help="Truncate longer examples (recorded per example).")
    ] = ExtractConfig.max_tokens,
    truncation_side: Annotated[
        str, typer.Option(rich_help_panel="Model", help="right keeps the beginning, left keeps the end.")
    ] = ExtractConfig.truncation_side,
    logits: Annotated[
        bool,
        typer.Option(
            rich_help_panel="Store",
            help="Also store next-token logits at the last prompt position "
            "(needed by the MULI baseline; ~2 B x vocab per example).",
        ),
    ] = ExtractConfig.logits,
    store_text: Annotated[
        bool,
        typer.Option(
            rich_help_panel="Store",
            help="Opt in to raw text in the manifest (stores may hold sensitive prompts; off by default).",
        ),
    ] = ExtractConfig.store_text,
    store_token_ids: Annotated[
        bool,
        typer.Option(
            rich_help_panel="Store",
            help="Opt in to storing each kept token's id beside its hidden states (per-token analysis; ids decode "
            "back to the text with the tokenizer, so off by default). Changes the store id.",
        ),
    ] = ExtractConfig.store_token_ids,
    share_prefixes: Annotated[
        bool,
        typer.Option(
            rich_help_panel="Store",
            help="Store each distinct prompt prefix (a chat template's system prompt, a fixed instruction) once per "
            "shard: later examples whose first states are bit-identical reference it instead of repeating it. "
            "Readers reassemble every example exactly; fewer bytes for chat-format stores. Needs --tokens all. "
            "Changes the store id.",
        ),
    ] = ExtractConfig.share_prefixes,
    layers: Annotated[
        str | None,
        typer.Option(
            rich_help_panel="Store",
            help="Keep only these layers, e.g. 0-4,20,-1 (0 = embedding output, -1 = last layer; the grammar of "
            "`train --layers`). Default: every layer. Training refuses a layer the store lacks. Changes the store id.",
        ),
    ] = ExtractConfig.layers,
    tokens: Annotated[
        str,
        typer.Option(
            rich_help_panel="Store",
            help="Which tokens of each prompt to keep: all (default), last, last-N (the last N) or every-K (every "
            "K-th counted back from the last, which is always kept). The pooled mean is over every token either "
            "way. Changes the store id.",
        ),
    ] = ExtractConfig.tokens,
    tier: Annotated[
        str,
        typer.Option(
            rich_help_panel="Store",
            help="How hidden states are stored: lossless (default), mantissa-K (K = 0..6 bf16 mantissa bits), "
            "fp8-e4m3, fp8-e5m2 or intK (K = 4..8: int8 codes in +-(2^(K-1)-1), per-token scales). Lossy tiers "
            "trade bytes for error: see docs/BENCHMARKS.md 'Storage tiers'. Changes the store id.",
        ),
    ] = ExtractConfig.tier,
    mantissa_bits: Annotated[
        int | None,
        typer.Option(
            rich_help_panel="Store",
            help="Same as --tier mantissa-K: round bf16 mantissas to K bits (4: ~1.4x smaller than lossless, "
            "~1% error).",
        ),
    ] = ExtractConfig.mantissa_bits,
    shard_size: Annotated[
        int, typer.Option(rich_help_panel="Store", help="Examples per shard (the unit of work and commit).")
    ] = ExtractConfig.shard_size,
    batch_tokens: Annotated[
        int, typer.Option(rich_help_panel="Speed", help="Padded tokens per forward batch.")
    ] = ExtractConfig.batch_tokens,
    max_batch_size: Annotated[
        int, typer.Option(rich_help_panel="Speed", help="Examples per forward batch at most.")
    ] = ExtractConfig.max_batch_size,
    encode_threads: Annotated[
        int | None,
        typer.Option(
            rich_help_panel="Speed",
            help="Threads compressing activations beside the forward pass. Default: 0 on a CPU device (the "
            "forward uses every core), cores - 1 with a GPU.",
        ),
    ] = ExtractConfig.encode_threads,
    validation_fraction: Annotated[
        float | None,
        typer.Option(
            rich_help_panel="Data",
            help="Share of train carved (stratified) as validation when a source has none (default 0.1).",
        ),
    ] = ExtractConfig.validation_fraction,
    seed: Annotated[
        int, typer.Option(rich_help_panel="Data", help="Seed for validation carving and --limit sampling.")
    ] = ExtractConfig.seed,
    progress: Annotated[
        bool, typer.Option(rich_help_panel="Speed", help="Progress bar and summary on stderr.")
    ] = ExtractConfig.progress,
    executor: Annotated[
        str, typer.Option(rich_help_panel="Cluster", help="local (this process), dask, or slurm (an sbatch array).")
    ] = LaunchConfig.executor,
    task_index: Annotated[
        int | None,
        typer.Option(rich_help_panel="Cluster", help="Run only shards K, K+N, ... (default: $SLURM_ARRAY_TASK_ID)."),
    ] = LaunchConfig.task_index,
    num_tasks: Annotated[
        int | None, typer.Option(rich_help_panel="Cluster", help="N tasks share the shards (with --task-index).")
    ] = LaunchConfig.num_tasks,
    workers: Annotated[
        int, typer.Option(rich_help_panel="Cluster", help="dask LocalCluster worker processes.")
    ] = LaunchConfig.workers,
    scheduler: Annotated[
        str | None,
        typer.Option(
            rich_help_panel="Cluster",
            help="dask scheduler address, or slurm: workers as SLURM jobs (dask-jobqueue). Default: a LocalCluster.",
        ),
    ] = LaunchConfig.scheduler,
    partition: Annotated[
        str | None, typer.Option(rich_help_panel="Cluster", help="SLURM partition.")
    ] = LaunchConfig.partition,
    time_limit: Annotated[
        str | None, typer.Option("--time", rich_help_panel="Cluster", help="SLURM time limit per task, e.g. 04:00:00.")
    ] = LaunchConfig.time_limit,
    gpus: Annotated[
        int, typer.Option(rich_help_panel="Cluster", help="GPUs per SLURM task (--gres=gpu:N).")
    ] = LaunchConfig.gpus,
    cpus_per_task: Annotated[
        int | None, typer.Option(rich_help_panel="Cluster", help="SLURM CPUs per task.")
    ] = LaunchConfig.cpus_per_task,
    mem: Annotated[
        str | None, typer.Option(rich_help_panel="Cluster", help="SLURM memory per task, e.g. 32G.")
    ] = LaunchConfig.mem,
    max_parallel: Annotated[
        int | None, typer.Option(rich_help_panel="Cluster", help="At most this many SLURM array tasks at once.")
    ] = LaunchConfig.max_parallel,
    dry_run: Annotated[
        bool, typer.Option(rich_help_panel="Cluster", help="With --executor slurm: print the sbatch script only.")
    ] = LaunchConfig.dry_run,
) -> None:
    """Run the model once over a dataset and store every hidden state of every real token.

    The store lands in ROOT/<store_id>; store_id hashes everything that changes the stored bytes, so the
    same command again is a cache hit and an interrupted run resumes. The last line of stdout is
    `store: <path>`.

    Examples: `probecache extract --limit 200` (embedded SmolLM2, Rotten Tomatoes);
    `probecache extract --dataset jigsaw --data-dir ../shared/data --prompt-format chat --logits`.
    """
    from transformers.utils import logging as hf_logging

    from probecache.extract.errors import Interrupted
    from probecache.extract.run import extract as run_extract

    hf_logging.disable_progress_bar()  # "Loading weights" bars would interleave with ours

    config = ExtractConfig(
        dataset=dataset,
        splits=tuple(split) if split else None,
        model=model,
        root=root or default_root(),
        limit=limit,
        data_dir=data_dir,
        text_col=text_col,
        label_col=label_col,
        id_col=id_col,
        strict=strict,
        dtype=dtype,
        device=device,
        prompt_format=prompt_format,
        max_tokens=max_tokens,
        truncation_side=truncation_side,
        logits=logits,
        store_text=store_text,
        store_token_ids=store_token_ids,
        share_prefixes=share_prefixes,
        layers=layers,
        tokens=tokens,
        tier=tier,
        mantissa_bits=mantissa_bits,
        shard_size=shard_size,
        batch_tokens=batch_tokens,
        max_batch_size=max_batch_size,
        encode_threads=encode_threads,
        validation_fraction=validation_fraction,
        seed=seed,
        progress=progress,
    )
    launch = LaunchConfig(
        executor=executor,
        task_index=task_index,
        num_tasks=num_tasks,
        workers=workers,
        scheduler=scheduler,
        partition=partition,
        time_limit=time_limit,
        gpus=gpus,
        cpus_per_task=cpus_per_task,
        mem=mem,
        max_parallel=max_parallel,
        dry_run=dry_run,
    )
    try:
        result = run_extract(config, launch)
    except user_errors() as e:
        fail(e)
    except Interrupted as e:
        typer.echo(f"interrupted: {e}", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        fail(
            OSError(
                f"no space left on the device holding {e.filename or config.root}: free space or pass "
                "another --root, then rerun (committed shards are kept)"
            )
        )
    if result.submitted and not launch.dry_run:
        typer.echo(f"submitted: {result.submitted}")
    typer.echo(f"store: {result.store_url or result.store_path}")


@app.command()
def datasets(
    data_dir: Annotated[
        str | None, typer.Option(help="Folder with file-backed datasets (env PROBECACHE_DATA_DIR).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list instead of a table.")] = False,
) -> None:
    """List the dataset registry: names, availability here, splits and sizes."""
    try:
        from probecache.extract.datasets import list_datasets

        infos = list_datasets(data_dir)
    except user_errors() as e:
        fail(e)
    if as_json:
        typer.echo(json.dumps([vars(i) for i in infos], indent=1))
        return
    rows = [["name", "kind", "available", "splits", "where / why"]]
    for i in infos:
        sizes = ", ".join(f"{s} {n:,}" for s, n in i.split_sizes.items()) or "-"
        rows.append([i.name, i.kind, "yes" if i.available else "no", sizes, i.detail])
    print_table(rows)


from probecache.cli_store import store_app  # noqa: E402

app.add_typer(store_app, name="store")

from probecache.cli_train import register as _register_train  # noqa: E402

_register_train(app)

from probecache.cli_serve import register as _register_serve  # noqa: E402

_register_serve(app)


def main() -> None:  # `python -m probecache`
    app(prog_name="probecache")


if __name__ == "__main__":
    sys.exit(main())
