"""The `farsync` command line. Each subcommand lives in its own module under
`farsync.cli` and exposes `register(app)`; this file only wires them together."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="farsync",
    help="DiLoCo and Streaming DiLoCo: train language models across slow links.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """DiLoCo and Streaming DiLoCo: train language models across slow links."""


def _register_all() -> None:
    from farsync.cli import env, simulate, train
    from farsync.cli import wan
    from farsync.cli import bench
    from farsync.cli import compare
    from farsync.cli import export
    from farsync.cli import lighthouse
    from farsync.cli import plan
    from farsync.cli import federate

    train.register(app)
    simulate.register(app)
    env.register(app)
    wan.register(app)
    bench.register(app)
    compare.register(app)
    export.register(app)
    lighthouse.register(app)
    plan.register(app)
    federate.register_cli(app)


_register_all()
