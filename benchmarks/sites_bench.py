"""Sites over emulated links: 2 hosts of 2 ranks (DDP or FSDP inside a host) against 2
hosts of 1 rank, on the same global batch and tokens, with `farsync wan`.

Every host is a network namespace whose link tbf limits to B Mbit/s in both directions
(B = 20 and 50). With ``--ranks 2`` a host runs 2 `farsync train` processes (RANK =
host·2 + local), one site of 2 ranks: rank r of each site exchanges shard r of every
pseudo-gradient with rank r of the other over its own TCP stream, both streams sharing
the host's link; the ranks of a host reach each other over its loopback. The recipe is
the default one's (recipes/default.toml: Streaming DiLoCo, P = 2, H = 20, overlap τ = 1,
α = 0.25, fp4-e3m0, the micro model, its lr, outer lr and momentum) at 2 workers and
fewer steps (``--steps``, 780 = 39 rounds by default, half the default run, so that the
six runs take under 15 minutes on a 2-core machine). Global batch 16 sequences per step:
8 per worker, so batch_size 8 at R = 1 and 4 per rank at R = 2; every run trains the
same tokens.

For each run: wall time, compute utilization (farsync's: compute ÷ (compute + blocked)),
cross-site bytes per host and per stream (farsync's accounting), the kernel's TCP payload
on each host's eth0 against it (target: within 1 %), what stayed inside a site (farsync's
site bytes, the kernel's loopback counters) and the final eval loss.

    flock /tmp/farsync-bench.lock .venv/bin/python benchmarks/sites_bench.py

Writes benchmarks/results/sites.json and benchmarks/results/sites.png. Needs root
(network namespaces, tc). The 2-core machine is CPU-bound with 4 processes: the R = 2
runs share 2 cores among 4 ranks, which is what they measure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from farsync.wan import LinkSpec, WanError  # noqa: E402
from farsync.wan.run import run_wan  # noqa: E402

HOSTS = 2
GLOBAL_BATCH = 16  # sequences per step over both hosts, as the default run (4 workers x 4)
STEPS = 780  # 39 rounds of H = 20
BANDWIDTHS_MBIT = (20, 50)
#: (ranks per host, site.parallel): "none" is one rank per host
CONFIGS = ((1, "none"), (2, "ddp"), (2, "fsdp"))
RECIPE = str(ROOT / "recipes" / "default.toml")


def overrides(steps: int, ranks: int, parallel: str, run_dir: str, name: str) -> list[str]:
    per_rank = GLOBAL_BATCH // (HOSTS * ranks)
    out = [f"--train.steps={steps}", f"--train.batch_size={per_rank}", f"--train.eval_every={steps}",
           f"--train.log_every=20", "--train.checkpoint_every=0", "--train.progress=false",
           f"--train.run_dir={run_dir}", f"--train.name={name}", "--train.overwrite=true"]
    if ranks > 1:
        out.append(f"--site.parallel={parallel}")
    return out


def run_one(steps: int, ranks: int, parallel: str, rate: float, run_dir: str) -> dict:
    name = f"{HOSTS}x{ranks}-{parallel}-{rate:g}mbit"
    t0 = time.perf_counter()
    rep = run_wan(RECIPE, overrides(steps, ranks, parallel, run_dir, name), workers=HOSTS, link=LinkSpec(rate),
                  timeout_s=1200, echo=False, ranks=ranks)
    elapsed = time.perf_counter() - t0
    s, hosts = rep["summary"], rep["per_host"]
    worst = max((h["payload_vs_farsync"] for h in hosts), key=abs)
    return {
        "hosts": HOSTS, "ranks": ranks, "parallel": parallel, "bandwidth_mbit": rate,
        "wall_seconds": s["wall_seconds"],
        "measured_utilization": s["compute_utilization"],
        "cross_site_bytes_per_host": [h["farsync_bytes"] for h in hosts],
        "payload_vs_farsync": worst,
        "eval_loss": s["final_eval_loss"],
        # beside the required figures
        "cross_site_bytes_per_stream": [h.get("farsync_bytes_per_stream", h["farsync_bytes"]) for h in hosts],
        "payload_vs_farsync_per_host": [h["payload_vs_farsync"] for h in hosts],
        "kernel_payload_bytes_per_host": [h["kernel_payload_bytes"] for h in hosts],
        "kernel_tx_bytes_per_host": [h["kernel_tx_bytes"] for h in hosts],
        "site_bytes_per_host": [h.get("site_bytes", 0) for h in hosts],
        "kernel_loopback_bytes_per_host": [h.get("kernel_lo_bytes", 0) for h in hosts],
        "route_to_own_address": [h.get("own_address_route") for h in hosts],
        "compute_seconds_per_step": s["compute_seconds"] / (HOSTS * s["steps"]),
        "blocked_seconds_per_worker": s["blocked_seconds"] / HOSTS,
        "steps": s["steps"], "tokens": s["tokens"], "batch_size_per_rank": GLOBAL_BATCH // (HOSTS * ranks),
        "sync_events": s["sync_events"], "parameters": s["parameters"],
        "tcp_retrans_segs": rep["tcp_retrans_segs"],
        "tbf_drops": sum(h["upload_drops"] + h["download_drops"] for h in hosts),
        "elapsed_seconds": elapsed,
        "run_dir": s["run_dir"],
    }


def machine() -> dict:
    import torch

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    return {"cpu": info.get("Model name", "unknown").strip(), "cores": os.cpu_count(),
            "threads_per_core": info.get("Thread(s) per core", "?").strip(), "gpu": None,
            "hypervisor": info.get("Hypervisor vendor", "").strip() or None, "kernel": platform.release(),
            "python": platform.python_version(), "torch": torch.__version__}


def plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({r["bandwidth_mbit"] for r in runs})
    labels = [f"{HOSTS}x{R} {p}" if R > 1 else f"{HOSTS}x1" for R, p in CONFIGS]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4))
    panels = [("wall_seconds", "wall time (s)", 1), ("measured_utilization", "compute utilization (%)", 100),
              ("eval_loss", "final eval loss", 1), ("payload_vs_farsync", "eth0 payload vs farsync (%)", 100)]
    width = 0.8 / len(CONFIGS)
    for ax, (key, title, scale) in zip(axes.flat, panels):
        for i, ((R, p), label) in enumerate(zip(CONFIGS, labels)):
            ys = [next((scale * r[key] for r in runs if r["ranks"] == R and r["parallel"] == p
                        and r["bandwidth_mbit"] == b), float("nan")) for b in rates]
            xs = [j + (i - (len(CONFIGS) - 1) / 2) * width for j in range(len(rates))]
            ax.bar(xs, ys, width, label=label, color=f"C{i}")
        ax.set_xticks(range(len(rates)), [f"{b:g} Mbit/s" for b in rates])
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        if key == "payload_vs_farsync":
            ax.axhline(1, color="grey", lw=0.8, ls=":")
        if key == "eval_loss":
            lo = min(r[key] for r in runs)
            ax.set_ylim(lo * 0.98, max(r[key] for r in runs) * 1.01)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{HOSTS} emulated hosts, Streaming DiLoCo + overlap + fp4, micro model, global batch {GLOBAL_BATCH}: "
                 "one rank per host vs a site of 2 ranks (DDP, FSDP)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--run-dir", default=str(ROOT / "benchmarks" / "out" / "sites"))
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--bandwidths", default=",".join(f"{b:g}" for b in BANDWIDTHS_MBIT), help="Mbit/s, comma-separated")
    args = ap.parse_args()
    if args.steps < 1:
        print(f"error: --steps {args.steps}: must be >= 1", file=sys.stderr)
        return 2
    try:
        rates = [float(b) for b in args.bandwidths.split(",")]
    except ValueError:
        print(f"error: --bandwidths {args.bandwidths}: comma-separated Mbit/s", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    runs = []
    try:
        for rate in rates:
            for ranks, parallel in CONFIGS:
                r = run_one(args.steps, ranks, parallel, rate, args.run_dir)
                runs.append(r)
                print(f"{HOSTS}x{ranks} {parallel:>4} {rate:>4g} Mbit/s: wall {r['wall_seconds']:6.1f} s, "
                      f"util {100 * r['measured_utilization']:5.1f} %, cross-site {r['cross_site_bytes_per_host'][0] / 1e6:.3f}"
                      f" MB/host ({r['cross_site_bytes_per_stream'][0] / 1e6:.3f} per stream), eth0 payload vs farsync "
                      f"{100 * r['payload_vs_farsync']:+.2f} %, loopback {r['kernel_loopback_bytes_per_host'][0] / 1e6:.1f}"
                      f" MB, eval {r['eval_loss']:.4f}", flush=True)
    except WanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = time.perf_counter() - t_start
    worst = max(abs(r["payload_vs_farsync"]) for r in runs)
    out = {
        "benchmark": "sites",
        "date": time.strftime("%Y-%m-%d"),
        "command": "flock /tmp/farsync-bench.lock .venv/bin/python benchmarks/sites_bench.py",
        "total_seconds": total,
        "machine": machine(),
        "setup": {
            "hosts": HOSTS, "recipe": "recipes/default.toml (Streaming DiLoCo P=2, H=20, tau=1, alpha=0.25, "
                                      "fp4-e3m0, micro model) at algo.workers=2", "steps": args.steps,
            "global_batch_sequences": GLOBAL_BATCH, "seq_len": 128,
            "batch_size_per_rank": {f"R={R}": GLOBAL_BATCH // (HOSTS * R) for R, _ in CONFIGS},
            "configs": [{"ranks": R, "parallel": p} for R, p in CONFIGS],
            "link": "tbf on each host's eth0 (upload) and its bridge port (download), both directions, burst max(2 "
                    "frames, 1 ms), queue 2000 ms, MTU 1500, TCP reno; latency not emulated (no netem); a host's R "
                    "ranks share its link",
            "launch": "farsync wan --ranks R: R processes per network namespace, RANK = host*R + local, env:// at "
                      "host 0, gloo over TCP; a host's ranks reach each other over its loopback",
            "overrides": overrides(args.steps, 2, "ddp", "RUN_DIR", "NAME"),
        },
        "runs": runs,
        "targets": {"kernel_vs_farsync_within_1pct": {"max_abs_payload_disagreement": worst, "met": worst <= 0.01}},
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sites.json"), "w") as f:
        json.dump(out, f, indent=2)
    plot(runs, os.path.join(args.out, "sites.png"))
    print(f"total {total:.0f} s; kernel vs farsync worst {100 * worst:+.2f} %; wrote {args.out}/sites.json and sites.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
