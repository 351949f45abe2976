"""`farsync compare RUN_DIR...`: runs side by side (a table and overlaid eval curves)."""

from __future__ import annotations

from typing import Optional

import typer

from farsync.cli.common import user_errors


def compare(
    run_dirs: list[str] = typer.Argument(..., help="Run directories (each with summary.json)."),
    out: Optional[str] = typer.Option(None, "--out", help="Where to write the overlay plot "
                                      "(default: compare.png beside the first run)."),
) -> None:
    """Eval loss, tokens, bytes per worker, ratio to data-parallel, peak bytes per sync,
    utilization and wall time of each run; overlay plots of eval loss vs tokens, vs bytes
    sent (log) and vs wall time."""
    from farsync.train.compare import compare as run_compare

    text, path = user_errors(lambda: run_compare(run_dirs, out))
    typer.echo(text)
    if path:
        typer.echo(f"\nplot: {path}")


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)
