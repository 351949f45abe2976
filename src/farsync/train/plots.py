"""Plots of a run directory: loss.png and bytes.png, drawn from metrics.jsonl."""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: str) -> tuple[list[dict], list[dict]]:
    train, evals = [], []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            (train if row["kind"] == "train" else evals).append(row)
    return train, evals


def plot_run(run_dir: str) -> list[str]:
    """Write loss.png (train and eval loss vs tokens) and bytes.png (cumulative bytes
    each worker sent vs tokens, against data-parallel's). Returns the paths."""
    train, evals = read_metrics(run_dir)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot([r["tokens"] for r in train], [r["train_loss"] for r in train], label="train (mean of workers)", lw=1)
    ax.plot([r["tokens"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval (global model)")
    ax.set_xlabel("tokens (all workers)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(os.path.basename(os.path.normpath(run_dir)))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(run_dir, "loss.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    tokens = [r["tokens"] for r in train]
    ax.plot(tokens, [r["bytes_sent_per_worker"] for r in train], label="this run")
    ax.plot(tokens, [r["dp_bytes_per_worker"] for r in train], "--", label="data-parallel (fp32 ring all-reduce)")
    ax.set_yscale("symlog", linthresh=1e3)
    ax.set_xlabel("tokens (all workers)")
    ax.set_ylabel("bytes sent per worker (cumulative)")
    if train and train[-1]["bytes_sent_per_worker"] > 0:
        ratio = train[-1]["dp_bytes_per_worker"] / train[-1]["bytes_sent_per_worker"]
        ax.set_title(f"{ratio:,.0f}× fewer bytes than data-parallel")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(run_dir, "bytes.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
