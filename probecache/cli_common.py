"""What every `probecache` command shares: which errors are the user's, and how they and tables print."""

from __future__ import annotations

import typer

from probecache.extract.datasets import DatasetError
from probecache.extract.errors import ExtractError, ModelError
from probecache.manifests.schema import ManifestError
from probecache.serve.errors import ServeError
from probecache.store.errors import StoreError

# Each stage's user errors: printed as one line on stderr, exit code 2, never a traceback.
USER_ERRORS = (DatasetError, ExtractError, ModelError, ManifestError, StoreError, ServeError)


def fail(error: Exception) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(2)


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        typer.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            typer.echo("  ".join("-" * w for w in widths))
