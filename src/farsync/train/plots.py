"""Plots of a run directory: loss.png and bytes.png, drawn from metrics.jsonl, and
workers.png from summary.json."""

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
            if row["kind"] == "train":
                train.append(row)
            elif row["kind"] == "eval":
                evals.append(row)
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

    summary_path = os.path.join(run_dir, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        if summary.get("per_worker") and summary.get("mode") != "dp":
            paths.append(plot_workers(summary["per_worker"], os.path.join(run_dir, "workers.png")))
    return paths


def plot_workers(workers: list[dict], path: str) -> str:
    """Per worker: tokens trained on, and its syncs joined / sat out / left out."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    ids = list(range(len(workers)))
    a.bar(ids, [w["tokens"] for w in workers], color="tab:blue")
    a.set_xlabel("worker")
    a.set_ylabel("tokens trained on")
    bottom = [0] * len(workers)
    for key, label, color in [("rounds_joined", "joined", "tab:green"), ("rounds_sat_out", "sat out", "tab:gray"),
                              ("rounds_excluded", "left out", "tab:red"), ("rounds_skipped", "skipped", "tab:orange")]:
        vals = [w[key] for w in workers]
        b.bar(ids, vals, bottom=bottom, label=label, color=color)
        bottom = [x + y for x, y in zip(bottom, vals)]
    b.set_xlabel("worker")
    b.set_ylabel("syncs")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.set_xticks(ids)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
