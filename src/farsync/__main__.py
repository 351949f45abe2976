"""`python -m farsync` — the CLI (also what `torchrun -m farsync` runs)."""

from farsync.cli.main import app

app()
