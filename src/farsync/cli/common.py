"""What every subcommand shares: turning bad input into one clear line and exit code 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

import typer

T = TypeVar("T")


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` to stderr and return the exit to raise (code 2)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


def user_errors(fn: Callable[[], T]) -> T:
    """Run ``fn``; a ValueError (bad input) becomes one line on stderr and exit code 2.
    Set FARSYNC_DEBUG=1 to see the traceback instead."""
    try:
        return fn()
    except ValueError as e:
        if os.environ.get("FARSYNC_DEBUG"):
            raise
        raise fail(str(e)) from None


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def echo_main(msg: str) -> None:
    if is_main_process():
        print(msg, file=sys.stdout, flush=True)
