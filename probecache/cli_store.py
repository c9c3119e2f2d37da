"""`probecache store ...`: inspecting stores (ls, info). Wired into the main app by cli.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from probecache.cli_common import USER_ERRORS, fail, print_table
from probecache.extract.config import default_root

store_app = typer.Typer(help="Inspect stores: `ls` a root, `info` on one store.", no_args_is_help=True)


@store_app.command("info")
def store_info(
    store: Annotated[str, typer.Argument(help="A store folder: ROOT/<store_id>.")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """What a store holds: model, dataset, examples, tokens, layers, bytes, shards committed."""
    from probecache.store.reader import open_store

    try:
        summary = open_store(store).summary()
    except USER_ERRORS as e:
        fail(e)
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    ratio = summary["bytes_raw"] / summary["bytes_stored"] if summary["bytes_stored"] else float("nan")
    lines = [
        ("store", summary["store_id"]),
        ("path", summary["path"]),
        ("model", f"{summary['model']} ({summary['model_weights'][:23]}...)"),
        ("dataset", f"{summary['dataset']}  splits {summary['splits']}  labels {summary['label_names']}"),
        ("examples", f"{summary['n_examples']:,} of {summary['n_examples_planned']:,} planned"),
        ("tokens", f"{summary['n_tokens']:,}"),
        ("layers x d", f"{summary['n_layers']} x {summary['hidden_size']} ({summary['logical_dtype']})"),
        ("stored", f"{summary['bytes_stored'] / 1e6:,.1f} MB (raw {summary['bytes_raw'] / 1e6:,.1f} MB, {ratio:.2f}x)"),
        (
            "shards",
            f"{summary['shards_committed']}/{summary['shards_total']} committed"
            + ("" if summary["complete"] else "  (incomplete: rerun the extract command to resume)"),
        ),
        ("prompt", f"{summary['prompt_format']}, max {summary['max_tokens']} tokens"),
        ("created", summary["created"]),
    ]
    for key, value in lines:
        typer.echo(f"{key:>11}  {value}")


@store_app.command("ls")
def store_ls(
    root: Annotated[
        str | None, typer.Argument(help="Folder holding stores (env PROBECACHE_ROOT; default ./stores).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list.")] = False,
) -> None:
    """List the stores under a root, newest first."""
    from probecache.store.reader import list_stores

    try:
        stores = list_stores(root or default_root())
    except USER_ERRORS as e:
        fail(e)
    if as_json:
        typer.echo(json.dumps(stores, indent=1))
        return
    if not stores:
        typer.echo(f"no stores under {root or default_root()}")
        return
    rows = [["store", "model", "dataset", "examples", "size", "status", "created"]]
    for s in stores:
        status = "complete" if s["complete"] else f"{s['shards_committed']}/{s['shards_total']} shards"
        rows.append(
            [
                s["store_id"],
                Path(s["model"]).name,
                s["dataset"],
                f"{s['n_examples']:,}",
                f"{s['bytes_stored'] / 1e6:,.1f} MB",
                status,
                s["created"],
            ]
        )
    print_table(rows)
