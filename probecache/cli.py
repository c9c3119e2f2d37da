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

import json  # noqa: E402
import sys  # noqa: E402
from typing import Annotated  # noqa: E402

import typer  # noqa: E402

from probecache.cli_common import USER_ERRORS, fail, print_table  # noqa: E402
from probecache.extract.config import DEFAULT_DATASET, ExtractConfig, default_root  # noqa: E402
from probecache.extract.datasets import list_datasets  # noqa: E402
from probecache.extract.models import DEFAULT_MODEL  # noqa: E402

app = typer.Typer(
    help="Cache every token x layer hidden state of a frozen LLM once; train probes from the cache.\n\n"
    "Start with `probecache extract` (embedded SmolLM2 on Rotten Tomatoes, offline), then "
    "`probecache store info STORE`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.command()
def extract(
    dataset: Annotated[
        str,
        typer.Option(
            rich_help_panel="Data",
            help="Registry name (see `probecache datasets`) or csv:PATH, tsv:PATH, jsonl:PATH, parquet:PATH.",
        ),
    ] = DEFAULT_DATASET,
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
    ] = DEFAULT_MODEL,
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
    ] = None,
    data_dir: Annotated[
        str | None,
        typer.Option(
            rich_help_panel="Data",
            help="Folder with file-backed datasets (jigsaw_toxic/, sst2/, ...) (env PROBECACHE_DATA_DIR).",
        ),
    ] = None,
    text_col: Annotated[
        str | None, typer.Option(rich_help_panel="Data", help="Text column of a csv:/jsonl:/parquet: file.")
    ] = None,
    label_col: Annotated[
        str | None, typer.Option(rich_help_panel="Data", help="Label column of a generic file.")
    ] = None,
    id_col: Annotated[
        str | None, typer.Option(rich_help_panel="Data", help="Id column of a generic file (default: id, else row).")
    ] = None,
    strict: Annotated[
        bool,
        typer.Option(
            rich_help_panel="Data",
            help="Bad rows (empty text, missing/unknown label, duplicate id) "
            "are an error instead of being excluded and reported.",
        ),
    ] = False,
    dtype: Annotated[
        str, typer.Option(rich_help_panel="Model", help="auto | bf16 | fp16 | fp32 (auto = bf16 where fast).")
    ] = "auto",
    device: Annotated[str, typer.Option(rich_help_panel="Model", help="auto | cpu | cuda[:N].")] = "auto",
    prompt_format: Annotated[
        str,
        typer.Option(
            rich_help_panel="Model",
            help="raw text, or chat: the model's chat template with a "
            "generation prompt (what a served prompt looks like).",
        ),
    ] = "raw",
    max_tokens: Annotated[
        int, typer.Option(rich_help_panel="Model", help="Truncate longer examples (recorded per example).")
    ] = 512,
    truncation_side: Annotated[
        str, typer.Option(rich_help_panel="Model", help="right keeps the beginning, left keeps the end.")
    ] = "right",
    logits: Annotated[
        bool,
        typer.Option(
            rich_help_panel="Store",
            help="Also store next-token logits at the last prompt position "
            "(needed by the MULI baseline; ~2 B x vocab per example).",
        ),
    ] = False,
    store_text: Annotated[
        bool,
        typer.Option(
            rich_help_panel="Store",
            help="Opt in to raw text in the manifest (stores may hold sensitive prompts; off by default).",
        ),
    ] = False,
    mantissa_bits: Annotated[
        int | None,
        typer.Option(
            rich_help_panel="Store",
            help="Lossy: round bf16 mantissas to K bits (4: ~2x smaller, ~1% error). Default lossless.",
        ),
    ] = None,
    shard_size: Annotated[
        int, typer.Option(rich_help_panel="Store", help="Examples per shard (the unit of work and commit).")
    ] = 512,
    batch_tokens: Annotated[int, typer.Option(rich_help_panel="Speed", help="Padded tokens per forward batch.")] = 4096,
    max_batch_size: Annotated[
        int, typer.Option(rich_help_panel="Speed", help="Examples per forward batch at most.")
    ] = 64,
    validation_fraction: Annotated[
        float | None,
        typer.Option(
            rich_help_panel="Data",
            help="Share of train carved (stratified) as validation when a source has none (default 0.1).",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(rich_help_panel="Data", help="Seed for validation carving and --limit sampling.")
    ] = 0,
    progress: Annotated[bool, typer.Option(rich_help_panel="Speed", help="Progress bar and summary on stderr.")] = True,
) -> None:
    """Run the model once over a dataset and store every hidden state of every real token.

    The store lands in ROOT/<store_id>; store_id hashes everything that changes the stored bytes, so the
    same command again is a cache hit and an interrupted run resumes. The last line of stdout is
    `store: <path>`.

    Examples: `probecache extract --limit 200` (embedded SmolLM2, Rotten Tomatoes);
    `probecache extract --dataset jigsaw --data-dir ../shared/data --prompt-format chat --logits`.
    """
    from transformers.utils import logging as hf_logging

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
        mantissa_bits=mantissa_bits,
        shard_size=shard_size,
        batch_tokens=batch_tokens,
        max_batch_size=max_batch_size,
        validation_fraction=validation_fraction,
        seed=seed,
        progress=progress,
    )
    try:
        result = run_extract(config)
    except USER_ERRORS as e:
        fail(e)
    typer.echo(f"store: {result.store_path}")


@app.command()
def datasets(
    data_dir: Annotated[
        str | None, typer.Option(help="Folder with file-backed datasets (env PROBECACHE_DATA_DIR).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list instead of a table.")] = False,
) -> None:
    """List the dataset registry: names, availability here, splits and sizes."""
    try:
        infos = list_datasets(data_dir)
    except USER_ERRORS as e:
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


def main() -> None:  # `python -m probecache`
    app(prog_name="probecache")


if __name__ == "__main__":
    sys.exit(main())
