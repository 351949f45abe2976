"""`farsync env`: what a bug report needs (versions, devices, backends)."""

from __future__ import annotations

import platform
import sys

import typer


def env() -> None:
    """Print versions, devices and distributed backends for bug reports."""
    import torch
    import torch.distributed as dist

    import farsync

    rows = [
        ("farsync", farsync.__version__),
        ("python", sys.version.split()[0]),
        ("platform", platform.platform()),
        ("torch", torch.__version__),
        ("cpu threads", str(torch.get_num_threads())),
        ("cuda available", str(torch.cuda.is_available())),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            rows.append((f"cuda:{i}", torch.cuda.get_device_name(i)))
    rows.append(("torch.distributed", str(dist.is_available())))
    if dist.is_available():
        rows.append(("gloo", str(dist.is_gloo_available())))
        rows.append(("nccl", str(dist.is_nccl_available())))
    for mod in ("tokenizers", "numpy", "matplotlib", "typer", "tqdm"):
        try:
            m = __import__(mod)
            rows.append((mod, getattr(m, "__version__", "?")))
        except ImportError:
            rows.append((mod, "not installed"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        typer.echo(f"{k:<{width}}  {v}")


def register(app: typer.Typer) -> None:
    app.command("env")(env)
