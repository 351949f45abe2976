"""`farsync lighthouse`: the membership service of elastic runs (torchft's Lighthouse)."""

from __future__ import annotations

import signal
import sys
import threading

import typer


def lighthouse(
    bind: str = typer.Option("[::]:29510", help="Address to listen on, HOST:PORT (port 0: any free port)."),
    min_workers: int = typer.Option(1, min=1, help="Fewest live workers a round may be taken with."),
    join_timeout_s: float = typer.Option(
        300.0, min=0.0, help="How long a sync waits for a worker that is alive (heartbeats) but late to it; then the "
        "others go on without it. Keep it above a round's length: a worker starting mid-run waits in a sync of its own "
        "for the others, and must not be let through alone."),
    heartbeat_timeout_s: float = typer.Option(5.0, min=0.1, help="A worker silent this long is counted out."),
) -> None:
    """Run the Lighthouse every worker of an elastic run reports to (until Ctrl-C).

    Start it on a host every site can reach, then start each worker with
    `farsync train RECIPE --elastic.enabled=true --elastic.worker=K --elastic.lighthouse=ADDRESS`.
    """
    try:
        from torchft.coordination import LighthouseServer
    except ImportError:
        typer.echo("error: farsync lighthouse needs torchft: pip install 'farsync[elastic]'", err=True)
        raise typer.Exit(2) from None
    try:
        server = LighthouseServer(bind=bind, min_replicas=min_workers, join_timeout_ms=int(join_timeout_s * 1000),
                                  quorum_tick_ms=100, heartbeat_timeout_ms=int(heartbeat_timeout_s * 1000))
    except Exception as e:  # a port in use, an address that does not parse
        typer.echo(f"error: cannot start the lighthouse on {bind}: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"lighthouse at {server.address()} (min workers {min_workers}); Ctrl-C to stop", err=True)
    sys.stdout.write(server.address() + "\n")
    sys.stdout.flush()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    server.shutdown()


def register(app: typer.Typer) -> None:
    app.command("lighthouse")(lighthouse)
