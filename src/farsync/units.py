"""Formatting of quantities for people (no torch, no farsync imports): used by the CLI,
the training loop's progress bar and the benchmark reports alike."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    """Decimal units, three significant digits: ``1.23 GB``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n:.3g} TB"
