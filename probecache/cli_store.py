"""`probecache store ...`: inspecting stores (ls, info) and maintaining them (status, verify, gc).

Wired into the main app by cli.py. Exit codes: 0 fine, 1 `verify` found problems, 2 a user error (not a
store, a bad option), printed as one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from probecache.cli_common import JsonOpt, fail, print_table, user_errors
from probecache.extract.config import default_root

store_app = typer.Typer(
    help="Inspect and maintain stores: `ls` a root; `info`, `status`, `verify`, `gc` on one store; `push` and "
    "`pull` copy stores to and from object storage; `convert` re-encodes a store at another value tier or cuts "
    "it to fewer layers or tokens; `decoded-cache` shows or clears train --decoded-cache's local copies. Roots and "
    "stores may be URLs: s3://bucket/prefix (a root), "
    "s3://bucket/prefix/<store_id> (a store; AWS_* environment), gs://..., file://...",
    no_args_is_help=True,
)
_MAX_PROBLEM_LINES = 50  # a badly damaged store can have thousands; the first ones say what happened
_STORE_HELP = "A store: ROOT/<store_id>, a folder or a URL (s3://bucket/prefix/<store_id>)."


def _where(text: str) -> str:
    """A STORE argument in canonical form. Through parse_root (store/remote.py), so an ``S3://KEY:SECRET@...`` or
    ``s3:/...`` is refused or read as the URL it is, never used as a local folder."""
    from probecache.store.remote import root_text

    return root_text(text)


@store_app.command("info")
def store_info(
    store: Annotated[str, typer.Argument(help=_STORE_HELP)],
    as_json: JsonOpt = False,
) -> None:
    """What a store holds: model, dataset, examples, tokens, layers, bytes, shards committed (local or URL)."""
    from probecache.store.reader import open_store

    try:
        summary = open_store(store).summary()
    except user_errors() as e:
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
        ("tokens", f"{summary['n_tokens']:,}" + ("" if summary["tokens"] == "all" else
                                                  f" kept ({summary['tokens']} of each prompt: --tokens)")
                   + ("" if summary["stored_tokens"] == summary["n_tokens"] else
                      f", {summary['stored_tokens']:,} stored (shared prefixes stored once: --share-prefixes)")),
        ("layers x d", f"{summary['n_layers']} x {summary['hidden_size']} ({summary['logical_dtype']}, "
                       f"{summary.get('tier', 'lossless')} values)"
                       + ("" if summary["layers"] == "all" else f", holding layers {summary['layers']} (--layers)")),
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
        str | None, typer.Argument(help="Folder or URL (s3://bucket/prefix) holding stores (env PROBECACHE_ROOT; "
                                   "default ./stores).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the stores under a root, newest first."""
    from probecache.store.errors import StoreError
    from probecache.store.reader import list_stores
    from probecache.store.remote import readable_root

    root = root or default_root()
    try:
        root = readable_root(root)
        stores = list_stores(root)
    except user_errors() as e:
        fail(e)
    except OSError as e:  # unreadable folder, I/O error: a local path that passed parse_root (URLs raise StoreError)
        fail(StoreError(f"store root {root}: {e.strerror or e}"))
    if as_json:
        typer.echo(json.dumps(stores, indent=1))
        return
    if not stores:
        typer.echo(f"no stores under {root}")
        return
    rows = [["store", "model", "dataset", "examples", "size", "status", "created"]]
    for s in stores:
        if "damaged" in s:  # listed, not fatal: `store verify` / `store info` on it say what is wrong
            rows.append([s["store_id"], "?", "?", "-", "-", "damaged: run `probecache store verify`", "-"])
            continue
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


@store_app.command("status")
def store_status_cmd(
    store: Annotated[str, typer.Argument(help=_STORE_HELP)],
    stale_after: Annotated[
        str, typer.Option("--stale-after", help="An uncommitted shard with no write for this long is stale "
                          "(its worker died): 30m, 6h, 2d.")
    ] = "6h",
    as_json: JsonOpt = False,
) -> None:
    """How far an extraction has got: shards committed / in progress / failed / stale, rate and ETA.

    On a URL: the committed shards and the uploads in flight (attempts still writing on an extracting host show
    in its staging folder's status)."""
    from probecache.store.status import format_status, store_status

    try:
        status = store_status(_where(store), stale_after=_age(stale_after, "--stale-after"))
    except user_errors() as e:
        fail(e)
    if as_json:
        typer.echo(json.dumps(status, indent=1))
        return
    for line in format_status(status):
        typer.echo(line)


@store_app.command("verify")
def store_verify(
    store: Annotated[str, typer.Argument(help=_STORE_HELP)],
    as_json: JsonOpt = False,
) -> None:
    """Check every committed shard against its commit record (sizes, crc32c), its arrays and the plan.

    On a URL every recorded file is downloaded and checksummed (nothing is kept).
    Exit 0 when clean, 1 when problems were found (one line each), 2 when STORE is not a store.
    """
    from probecache.store.verify import verify_store

    try:
        report = verify_store(_where(store))
    except user_errors() as e:
        fail(e)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=1))
    else:
        checked = (f"{report.parts_checked} parts of {report.shards_total} shards, {report.files_checked} files, "
                   f"{report.bytes_checked / 1e6:,.1f} MB checksummed")
        for problem in report.problems[:_MAX_PROBLEM_LINES]:
            typer.echo(f"problem: {problem}")
        if len(report.problems) > _MAX_PROBLEM_LINES:
            typer.echo(f"... and {len(report.problems) - _MAX_PROBLEM_LINES} more problems (--json lists all)")
        for note in report.notes:
            typer.echo(f"note: {note}")
        typer.echo(f"{'ok' if report.ok else f'FAILED: {len(report.problems)} problems'}: {checked}")
    if not report.ok:
        raise typer.Exit(1)


@store_app.command("gc")
def store_gc(
    store: Annotated[str, typer.Argument(help=_STORE_HELP)],
    older_than: Annotated[
        str, typer.Option("--older-than", help="Only remove debris idle this long: 0, 30s, 15m, 6h, 2d. Segments "
                          "that a running extraction or upload holds a lease on are kept whatever this says.")
    ] = "6h",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be removed; delete nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove orphan segments (killed or losing attempts), their stats, stale leases and temp files.

    Never touches a segment a manifest part references or a running attempt holds a lease on, a name it did
    not create, or anything behind a symbolic link; deletes nothing (exit 2) in a store that does not verify
    structurally (rerun the extract command to repair it first).
    """
    from probecache.store.gc import format_gc, gc_store

    try:
        store = _where(store)
        report = gc_store(store, _age(older_than, "--older-than"), dry_run=dry_run)
    except user_errors() as e:
        fail(e)
    except OSError as e:  # a permission or I/O error mid-way: what was removed so far was removable
        from probecache.store.errors import StoreError

        fail(StoreError(f"gc of {store} stopped: {e.strerror or e} ({e.filename}): fix the permissions and run it "
                        "again"))
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=1))
        return
    for line in format_gc(report):
        typer.echo(line)


@store_app.command("decoded-cache")
def store_decoded_cache(
    folder: Annotated[str | None, typer.Option("--dir", help="The cache's folder \\[default: "
                                               "$PROBECACHE_CACHE/decoded].", show_default=False)] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Delete the entries (of --store only, if given).")] = False,
    store_id: Annotated[str | None, typer.Option("--store", help="Only this store id's entries.",
                                                 show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show (or --clear) the decoded cache that `train --decoded-cache` fills: bytes per store id.

    Entries are uncompressed copies of the blocks training read; deleting them is always safe (a reader that finds
    its entry gone reads the store), so --clear may run while training runs.
    """
    from probecache.store.decoded_cache import DecodedCache, default_dir

    cache = DecodedCache(Path(folder).expanduser() if folder else default_dir(), 0)
    freed = cache.clear(store_id) if clear else 0
    usage = {k: v for k, v in cache.usage().items() if store_id is None or k == store_id}
    if as_json:
        typer.echo(json.dumps({"folder": str(cache.root), "freed_bytes": freed,
                               "stores": {k: {"entries": n, "bytes": b} for k, (n, b) in usage.items()}}, indent=1))
        return
    if clear:
        typer.echo(f"freed {freed / 2**30:.2f} GiB")
    if not usage:
        typer.echo(f"{cache.root}: empty")
        return
    rows = [[k, str(n), f"{b / 2**30:.2f}"] for k, (n, b) in sorted(usage.items())]
    print_table([["store", "entries", "GiB"], *rows])
    typer.echo(f"{cache.root}: {sum(b for _, b in usage.values()) / 2**30:.2f} GiB in all")


@store_app.command("push")
def store_push(
    local: Annotated[str, typer.Argument(help="A local store folder: ROOT/<store_id>.")],
    url: Annotated[str, typer.Argument(help="Where to: a root URL (s3://bucket/prefix; the store goes to "
                                             "URL/<store_id>) or the store URL itself.")],
    verify_existing: Annotated[bool, typer.Option("--verify-existing", help="Download and checksum files already "
                                                  "at the destination instead of trusting their size.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Copy a store's committed shards that the destination lacks: segments first, each part last.

    Resumable (rerun after an interruption copies only what is missing) and verified (every file is checked
    against its commit record before it is sent); the destination is a valid store at every moment.
    """
    from probecache.store.transfer import push

    try:
        report = push(local, url, verify_existing=verify_existing, progress=not as_json)
    except user_errors() as e:
        fail(e)
    _print_transfer(report, as_json)


@store_app.command("pull")
def store_pull(
    url: Annotated[str, typer.Argument(help="A store URL: s3://bucket/prefix/<store_id> (or any store folder).")],
    local: Annotated[str, typer.Argument(help="A local root (the store goes to LOCAL/<store_id>) or the store "
                                               "folder itself.")],
    as_json: JsonOpt = False,
) -> None:
    """Copy a remote store's committed shards that the local copy lacks (verified, resumable, valid throughout)."""
    from probecache.store.transfer import pull

    try:
        report = pull(url, local, progress=not as_json)
    except user_errors() as e:
        fail(e)
    _print_transfer(report, as_json)


def _print_transfer(report, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=1))
        return
    lost = f", {len(report.shards_lost)} committed by another writer meanwhile" if report.shards_lost else ""
    typer.echo(f"copied {len(report.shards_copied)} shards ({report.files_copied} files, "
               f"{report.bytes_copied / 1e6:,.1f} MB; {report.files_present} files already there), "
               f"{report.shards_present} already present{lost}; "
               f"{len(report.shards_copied) + report.shards_present + len(report.shards_lost)}/{report.shards_total} "
               "shards at the destination")
    typer.echo(f"store: {report.destination}")


def _age(text: str, option: str) -> float:
    """A duration option, or the one-line error (exit 2) naming the accepted forms."""
    from probecache.store.errors import StoreError
    from probecache.store.gc import parse_age

    try:
        return parse_age(text)
    except ValueError as e:
        fail(StoreError(f"{option}: {e}"))
        raise  # unreachable: fail() exits; keeps type checkers from assuming a fall-through


@store_app.command("convert")
def store_convert(
    src: Annotated[str, typer.Argument(help="A complete lossless local store folder: ROOT/<store_id>.")],
    tier: Annotated[str | None, typer.Option("--tier", help="The new store's value tier: lossless, mantissa-K, "
                                                            "fp8-e4m3, fp8-e5m2 or intK (K = 4..8). Default: SRC's.")]
    = None,
    layers: Annotated[str | None, typer.Option("--layers", help="Keep only these layers, e.g. 0-4,20,-1 (those SRC "
                                                                "holds). Default: every layer SRC holds.")] = None,
    tokens: Annotated[str | None, typer.Option("--tokens", help="Keep only these tokens of each prompt: all, last, "
                                                                "last-N or every-K (SRC must hold every token). "
                                                                "Default: SRC's.")] = None,
    root: Annotated[Path | None, typer.Option(help="Where the new store goes (default: SRC's root).")] = None,
    partial: Annotated[bool, typer.Option("--partial", help="Convert an incomplete source's committed shards "
                                                            "(rerun after it completes to add the rest).")] = False,
) -> None:
    """Write SRC re-encoded at another value tier, or cut to fewer layers or tokens, as a new store without the
    model: the same store id and the same values `extract --tier/--layers/--tokens` would give. Resumable: rerun
    after an interruption converts only what is missing.
    """
    import sys

    from probecache.store.convert import Conversion, check_convertible, convert_store
    from probecache.store.reader import open_store

    src_path = Path(src)
    try:
        source = open_store(src_path)
        conversion = Conversion.of(source, tier, layers, tokens)
        check_convertible(source, conversion, partial)  # refusals before the progress bar draws
        n_shards = len(source.layout.committed_shards())
        with typer.progressbar(length=n_shards, label=f"convert to {conversion.tier.name}", file=sys.stderr) as bar:
            path = convert_store(src_path, root if root is not None else src_path.parent, conversion.tier, partial,
                                 progress=lambda _shard, _done: bar.update(1), layers=conversion.layers,
                                 tokens=conversion.tokens)
    except user_errors() as e:
        fail(e)
    typer.echo(f"store: {path}")
