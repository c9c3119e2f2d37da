"""What every `probecache` command shares: which errors are the user's, and how they and tables print."""

from __future__ import annotations

from typing import Annotated

import typer


class CliError(Exception):
    """An option or combination of options the command line itself refuses (`--seeds 0`, `--text` with `--file`):
    one `error:` line, exit code 2, like the stages' user errors."""


def user_errors() -> tuple[type[Exception], ...]:
    """Each stage's user errors (and the CLI's own): one line on stderr, exit code 2, no traceback.

    Only these: any other exception (a ValueError from numpy, torch or our own code included) is a bug and keeps
    its traceback (exit code 1).

    A function, imported when an exception is being matched (`except user_errors() as e`), so that `--help`
    and `--version` import no stage (ManifestError lives beside pyarrow).
    """
    from probecache.extract.datasets import DatasetError
    from probecache.extract.errors import ExtractError
    from probecache.lm.errors import ModelError
    from probecache.manifests.schema import ManifestError
    from probecache.serve.errors import ServeError
    from probecache.store.errors import StoreError
    from probecache.train.errors import TrainError

    return (CliError, DatasetError, ExtractError, ModelError, ManifestError, StoreError, ServeError, TrainError)


def __getattr__(name: str):
    if name == "USER_ERRORS":  # the old constant, for code outside the CLI that imported it
        return user_errors()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fail(error: Exception) -> None:
    """A user error as one line on stderr, exit code 2; with PROBECACHE_DEBUG=1 its traceback first (to see
    where an error that looks like the user's really came from)."""
    import os

    if os.environ.get("PROBECACHE_DEBUG", "") not in ("", "0"):
        import traceback

        typer.echo("".join(traceback.format_exception(error)).rstrip(), err=True)
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(2)



# Options several commands share, declared once (help text and spelling stay the same everywhere)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of a table.")]
StoreRootOpt = Annotated[str | None, typer.Option("--root", help="Where store ids are looked up \\[default: "
                                                  "$PROBECACHE_ROOT or stores].", show_default=False)]
DeviceOpt = Annotated[str, typer.Option(help="cpu | cuda[:N] | mps | auto (a device this machine lacks is a "
                                             "one-line error).")]

def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        typer.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            typer.echo("  ".join("-" * w for w in widths))
