"""The default `farsync train` with its M = 4 workers in one process (train.launch=inprocess,
every worker's step one after another on one core) against one process per worker
(train.launch=processes, what `auto` picks on a machine with 2 or more cores), on this machine.

Both run the README's first command unchanged (recipes/default.toml: 1560 steps, the
embedded corpus) in its own run directory; they alternate, --repeats times each. The figure
is the command's wall time (start to exit: imports, corpus, training, evaluation, summary)
and the trainer's own wall_seconds; the run must end with the same final eval loss to the
last digit, the same bytes and the same loss curve (metrics.jsonl) as the in-process run.

    flock /tmp/farsync-bench.lock .venv/bin/python benchmarks/launch_bench.py [--repeats 2]

Writes benchmarks/results/launch.json and launch.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAUNCHES = ("inprocess", "processes")


def run(launch: str, run_dir: Path, i: int) -> dict:
    name = f"{launch}-{i}"
    cmd = [str(ROOT / ".venv" / "bin" / "farsync"), "train", f"--train.launch={launch}", f"--train.run_dir={run_dir}",
           f"--train.name={name}", "--train.progress=false"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out = run_dir / name
    summary = json.loads((out / "summary.json").read_text())
    curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [{k: v for k, v in r.items() if k != "wall_seconds"} for r in curve]  # every row but its clock
    return {"launch": launch, "command_seconds": wall, "training_seconds": summary["wall_seconds"],
            "final_eval_loss": summary["final_eval_loss"], "bytes_sent_total": summary["bytes_sent_total"],
            "losses": losses}


def machine() -> dict:
    import torch

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    return {"cpu": info.get("Model name", "unknown").strip(), "cores": os.cpu_count(), "gpu": None,
            "kernel": platform.release(), "python": platform.python_version(), "torch": torch.__version__}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if args.repeats < 1:
        print(f"error: --repeats {args.repeats}: must be >= 1", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="farsync-launch-"))
    runs: dict[str, list[dict]] = {k: [] for k in LAUNCHES}
    for i in range(args.repeats):
        for launch in LAUNCHES:
            r = run(launch, work, i)
            runs[launch].append(r)
            print(f"{launch:>9}: {r['command_seconds']:6.1f} s (training {r['training_seconds']:6.1f} s), "
                  f"eval loss {r['final_eval_loss']!r}, {r['bytes_sent_total']:,} bytes", flush=True)
    ref = runs["inprocess"][0]
    same = all(r["final_eval_loss"] == ref["final_eval_loss"] and r["bytes_sent_total"] == ref["bytes_sent_total"]
               and r["losses"] == ref["losses"] for rs in runs.values() for r in rs)
    med = {k: {"command_seconds": statistics.median(r["command_seconds"] for r in rs),
               "training_seconds": statistics.median(r["training_seconds"] for r in rs)} for k, rs in runs.items()}
    speedup = med["inprocess"]["command_seconds"] / med["processes"]["command_seconds"]
    result = {
        "benchmark": "launch", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
        "command": "flock /tmp/farsync-bench.lock .venv/bin/python benchmarks/launch_bench.py"
                   + (f" --repeats {args.repeats}" if args.repeats != 2 else ""),
        "job": "farsync train (recipes/default.toml: Streaming DiLoCo, 4 workers, 1560 steps, micro model)",
        "runs": {k: [{kk: v for kk, v in r.items() if kk != "losses"} for r in rs] for k, rs in runs.items()},
        "median": med,
        "final_eval_loss": ref["final_eval_loss"],
        "targets": {
            "speedup_at_least_1.5x": {"value": speedup, "met": speedup >= 1.5},
            "same_eval_loss_bytes_and_curve": {"value": same, "met": same},
        },
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "launch.json").write_text(json.dumps(result, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.8))
    ax.barh(list(LAUNCHES), [med[k]["command_seconds"] for k in LAUNCHES], color=["tab:gray", "tab:blue"])
    ax.set_xlabel("seconds, command start to exit (median)")
    ax.set_title(f"farsync train (default job) on {os.cpu_count()} cores: processes {speedup:.2f}× faster, "
                 f"eval loss {'identical' if same else 'DIFFERENT'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "launch.png", dpi=120)
    print(json.dumps(result["targets"]))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
