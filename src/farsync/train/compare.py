"""Side by side: several run directories' figures in one table, and their eval curves
overlaid (loss vs tokens, vs bytes each worker sent, vs wall time).

Reads only what a run leaves behind (``summary.json``, ``metrics.jsonl``): runs from
different machines, backends or farsync versions compare as long as those files exist.
"""

from __future__ import annotations

import json
import os

from farsync.units import format_bytes

#: (column title, how to get it from a run's summary, how to print it)
COLUMNS = [
    ("run", lambda s: s["_name"], str),
    ("mode", lambda s: s.get("mode"), str),
    ("M", lambda s: s.get("workers"), str),
    ("eval loss", lambda s: s.get("final_eval_loss"), lambda v: f"{v:.4f}"),
    ("tokens", lambda s: s.get("tokens"), lambda v: f"{v:,}"),
    ("bytes/worker", lambda s: max(s["bytes_sent_per_worker"]) if s.get("bytes_sent_per_worker") else None, format_bytes),
    ("vs DP", lambda s: s.get("dp_bytes_ratio"), lambda v: f"{v:,.0f}×"),
    ("peak/sync", lambda s: s.get("peak_bytes_per_sync"), format_bytes),
    ("utilization", lambda s: s.get("compute_utilization"), lambda v: f"{100 * v:.1f} %"),
    ("wall", lambda s: s.get("wall_seconds"), lambda v: f"{v:,.1f} s"),
]


def load_run(run_dir: str) -> tuple[dict, list[dict]]:
    """A finished run's summary and its metrics rows; ValueError naming what is missing."""
    summary_path = os.path.join(run_dir, "summary.json")
    if not os.path.isdir(run_dir):
        raise ValueError(f"{run_dir!r} is not a directory")
    if not os.path.exists(summary_path):
        raise ValueError(f"{run_dir!r} has no summary.json (not a finished farsync run)")
    with open(summary_path) as f:
        summary = json.load(f)
    rows = []
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    summary["_name"] = os.path.basename(os.path.normpath(run_dir))
    return summary, rows


def table(summaries: list[dict]) -> str:
    """The runs' figures as an aligned text table (— where a run lacks a figure)."""
    cells = [[title for title, _, _ in COLUMNS]]
    for s in summaries:
        row = []
        for _, get, fmt in COLUMNS:
            try:
                v = get(s)
            except (KeyError, TypeError, ValueError):
                v = None
            row.append("—" if v is None else fmt(v))
        cells.append(row)
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def curves(summary: dict, rows: list[dict]) -> list[dict]:
    """Eval points with the tokens, bytes one worker had sent by then, and wall time.
    Bytes: those of the last train row at or before the eval's step (exact when evals
    fall on log steps; else the bytes a log interval or less earlier); the final point
    takes the summary's total."""
    import bisect

    train = sorted((r["step"], r.get("bytes_sent_per_worker")) for r in rows if r.get("kind") == "train")
    steps_logged = [s for s, _ in train]
    last = max(summary["bytes_sent_per_worker"]) if summary.get("bytes_sent_per_worker") else None
    out = []
    for r in rows:
        if r.get("kind") != "eval":
            continue
        i = bisect.bisect_right(steps_logged, r["step"]) - 1
        b = last if r["step"] == summary.get("steps") else (train[i][1] if i >= 0 else None)
        out.append({"tokens": r["tokens"], "eval_loss": r["eval_loss"], "bytes": b, "wall": r.get("wall_seconds")})
    return out


def plot(runs: list[tuple[dict, list[dict]]], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for summary, rows in runs:
        pts = curves(summary, rows)
        label = summary["_name"]
        for ax, key in zip(axes, ("tokens", "bytes", "wall")):
            xy = [(p[key], p["eval_loss"]) for p in pts if p[key] is not None and (key != "bytes" or p[key] > 0)]
            if xy:
                ax.plot(*zip(*xy), "o-", label=label, ms=3)
    for ax, xlabel in zip(axes, ("tokens (all workers)", "bytes sent per worker", "wall time (s)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("eval loss")
        ax.grid(alpha=0.3, which="both")
    axes[1].set_xscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare(run_dirs: list[str], out: str | None = None) -> tuple[str, str | None]:
    """The table, and the path of the overlay plot (written to ``out``, default
    ``compare.png`` beside the first run, when any run has eval points)."""
    if not run_dirs:
        raise ValueError("give at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    text = table([s for s, _ in runs])
    path = None
    if any(curves(s, r) for s, r in runs):
        path = plot(runs, out or os.path.join(os.path.dirname(os.path.normpath(run_dirs[0])) or ".", "compare.png"))
    return text, path
