"""Real processes over rate-limited links: DP, DiLoCo and Streaming DiLoCo measured with
`farsync wan`, beside the simulator's prediction for the same setup.

Two emulated hosts (network namespaces on a private bridge), each host's link limited
by tbf to B Mbit/s in both directions, one `farsync train` worker per host (gloo over
TCP). For every method × bandwidth it records wall time, compute utilization, bytes on
the wire (kernel counters and farsync's own accounting), final eval loss, and what
`farsync.sim` predicts for the same run.

    flock /tmp/farsync-bench.lock python benchmarks/wan_bench.py [--out benchmarks/results]

Writes benchmarks/results/wan.json and benchmarks/results/wan_utilization.png. Needs
root (network namespaces, tc). About 12 minutes on 2 CPU cores.

What the simulator is fed, per run (nothing is fitted to the measured utilization):
    layers, parameters   the model's (4 blocks, 984,448 parameters; the simulator spreads
                         the parameters evenly over the blocks)
    step_time            the pure-compute seconds per inner step measured in that same run
                         (farsync's compute_seconds / steps, mean of the two workers): the
                         simulator predicts time blocked on the link, not compute speed,
                         and the CPU is shared, so the compute speed of the run is used
    M, H, P, τ, codec    the run's: 2, 20, 1 or 2, 0 or 1, fp32 or fp4-e3m0
    collective/schedule  all-gather (what farsync uses for M = 2), after-backward (farsync
                         starts an exchange after the inner optimizer step)
    bandwidth            tbf rate × 0.936 (TCP payload share of the frames tbf counts:
                         1448 B per 1514 B segment plus one 66 B ACK per two segments of
                         the reverse direction; both directions are loaded) × (simulator's
                         wire bytes / farsync's exact bytes for the same syncs), which
                         corrects for the codec tables differing (the simulator's FP4 has
                         one fp32 scale per 128 values, farsync.codecs one per 32)
    latency              0 (not emulated: no netem here)
The simulator answers in steady state (period after period of H steps). A run of S steps
has no syncs in its first H steps and fewer syncs than S/H periods would, so the
prediction for the run is S·T / (S·T + n·b), with b the steady-state time blocked per
sync event and n the sync events the run performed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from farsync import sim  # noqa: E402
from farsync.codecs import get_codec  # noqa: E402
from farsync.comm import exchange as ex  # noqa: E402
from farsync.wan import LinkSpec, WanError  # noqa: E402
from farsync.wan.run import run_wan  # noqa: E402

DATE = "2026-11-22"
STEPS = 64  # S: 3 rounds of H = 20 plus 4 steps, so no fragment is still in flight at the end
H = 20
LAYERS = 4  # the "tiny" model
BANDWIDTHS_MBIT = (20, 50, 100, 200)
PAYLOAD_FRACTION = 1448 / (1514 + 66 / 2)

COMMON = [
    "--model.size=tiny", "--model.seq_len=128", "--train.batch_size=8",
    "--data.max_bytes=1000000", "--data.val_fraction=0.1", "--data.vocab_size=512",
    f"--train.steps={STEPS}", f"--algo.inner_steps={H}", "--optim.warmup_steps=10",
    "--train.threads=1", "--train.progress=false", "--train.checkpoint_every=0",
    f"--train.log_every={STEPS}", f"--train.eval_every={STEPS}", "--train.eval_batches=4",
]

# method -> (farsync overrides, simulator method, P, τ, codec)
METHODS: dict[str, tuple[list[str], str, int, int, str]] = {
    "dp": (["--algo.mode=dp"], "dp", 1, 0, "fp32"),
    "diloco": (["--algo.mode=diloco", "--algo.fragments=1", "--algo.sync_delay=0", "--algo.codec=fp32"],
               "diloco", 1, 0, "fp32"),
    "streaming": (["--algo.mode=streaming", "--algo.fragments=2", "--algo.sync_delay=0", "--algo.codec=fp32"],
                  "streaming", 2, 0, "fp32"),
    "streaming-overlap": (["--algo.mode=streaming", "--algo.fragments=2", "--algo.sync_delay=1",
                           "--algo.codec=fp32"], "streaming-overlap", 2, 1, "fp32"),
    "streaming-overlap-fp4": (["--algo.mode=streaming", "--algo.fragments=2", "--algo.sync_delay=1",
                               "--algo.codec=fp4-e3m0"], "streaming-overlap-fp4", 2, 1, "fp4-e3m0"),
}


def sim_config(method: str, params: int, step_time: float, bandwidth_gbps: float) -> sim.SimConfig:
    _, sim_method, P, tau, codec = METHODS[method]
    model = sim.ModelSpec("tiny", LAYERS, float(params), step_time)
    kw = dict(workers=2, inner_steps=H, latency_s=0.0, reductions="after-backward", exchange="all-gather",
              bandwidth_gbps=bandwidth_gbps)
    if sim_method != "dp":
        kw["fragments"] = P
    if tau:
        kw["sync_delay"] = tau
    if sim_method != "streaming-overlap-fp4":  # that method brings its own codec (fp4-e3m0)
        kw["codec"] = codec
    return sim.method_config(model, sim_method, **kw)


def events_per_period(cfg: sim.SimConfig) -> int:
    return 1 if cfg.mode == "dp" else cfg.n_fragments


def byte_ratio(method: str, params: int, fragment_sizes: list[int]) -> float:
    """Simulator's wire bytes / farsync's exact bytes, over one sync of every fragment."""
    cfg = sim_config(method, params, 1.0, 1.0)
    codec = get_codec(METHODS[method][4])
    sizes = [params] if cfg.mode != "streaming" else fragment_sizes
    ours = sum(ex.make_plan(n, 2, codec).bytes_sent + ex.make_plan(n, 2, codec).control_bytes for n in sizes)
    theirs = sum(cfg.bytes_sent_per_worker(params / cfg.n_fragments) for _ in sizes)
    return theirs / ours


def predict(method: str, params: int, step_time: float, rate_mbit: float, ratio: float, events: int) -> dict:
    """The simulator's steady state for this setup, and its prediction for a run with
    `events` sync events over STEPS steps."""
    bw = rate_mbit * 1e-3 * PAYLOAD_FRACTION * ratio
    cfg = sim_config(method, params, step_time, bw)
    res = sim.simulate(cfg)
    blocked_per_event = (res.wall_per_step_s - step_time) * cfg.period / events_per_period(cfg)
    busy = STEPS * step_time + events * blocked_per_event
    return {
        "sim_bandwidth_gbps": bw,
        "steady_state_utilization": res.utilization,
        "blocked_per_sync_s": blocked_per_event,
        "utilization": STEPS * step_time / busy,
        "busy_seconds_per_worker": busy,
    }


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "torch": torch.__version__, "tc": subprocess.run(["tc", "-V"], capture_output=True, text=True).stdout.strip()}


def fragment_sizes() -> list[int]:
    import torch

    from farsync.algorithms.fragments import build_fragments
    from farsync.models import Llama, model_config

    torch.manual_seed(0)
    m = Llama(model_config("tiny", 512, 128))
    return [f.numel for f in build_fragments(m, 2, "strided")]


def run_one(method: str, rate: float, run_dir: str) -> dict:
    overrides = [*COMMON, *METHODS[method][0], f"--train.run_dir={run_dir}", f"--train.name={method}-{rate:g}mbit"]
    t0 = time.perf_counter()
    rep = run_wan(None, overrides, workers=2, link=LinkSpec(rate), timeout_s=900, echo=False)
    elapsed = time.perf_counter() - t0
    s = rep["summary"]
    hosts = rep["per_host"]
    step_time = s["compute_seconds"] / (2 * s["steps"])
    return {
        "method": method, "bandwidth_mbit": rate,
        "wall_seconds": s["wall_seconds"], "elapsed_seconds": elapsed,
        "compute_seconds_per_step": step_time,
        "blocked_seconds_per_worker": s["blocked_seconds"] / 2,
        "sync_events": s["sync_events"],
        "measured_utilization": s["compute_utilization"],
        "farsync_bytes_per_host": statistics.mean(h["farsync_bytes"] for h in hosts),
        "kernel_tx_bytes_per_host": statistics.mean(h["kernel_tx_bytes"] for h in hosts),
        "kernel_payload_bytes_per_host": statistics.mean(h["kernel_payload_bytes"] for h in hosts),
        "payload_vs_farsync": max((h["payload_vs_farsync"] for h in hosts), key=abs),
        "wire_vs_farsync": max(h["wire_vs_farsync"] for h in hosts),
        "tcp_retrans_segs": rep["tcp_retrans_segs"],
        "tbf_drops": sum(h["upload_drops"] + h["download_drops"] for h in hosts),
        "final_eval_loss": s["final_eval_loss"],
        "parameters": s["parameters"],
    }


def plot(runs: list[dict], curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, method in enumerate(METHODS):
        color = f"C{i}"
        pts = [r for r in runs if r["method"] == method]
        ax.plot([r["bandwidth_mbit"] for r in pts], [100 * r["measured_utilization"] for r in pts], "o",
                color=color, label=f"{sim.METHOD_LABELS[METHODS[method][1]]}")
        bws, util = curves[method]
        ax.plot(bws, [100 * u for u in util], "-", color=color, lw=1, alpha=0.8)
    ax.axhline(95, color="grey", lw=0.5, ls=":")
    ax.axhline(30, color="grey", lw=0.5, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("link rate per host and direction (Mbit/s, tbf)")
    ax.set_ylabel("compute utilization (%)")
    ax.set_ylim(0, 102)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title("2 hosts, tiny model (0.98 M params): measured (dots) vs simulated (lines)", fontsize=10)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--run-dir", default=str(ROOT / "benchmarks" / "out" / "wan"))
    ap.add_argument("--bandwidths", default=",".join(str(b) for b in BANDWIDTHS_MBIT),
                    help="Mbit/s, comma-separated")
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    rates = [float(b) for b in args.bandwidths.split(",")]
    methods = args.methods.split(",")
    frags = fragment_sizes()
    t_start = time.perf_counter()
    runs = []
    try:
        for rate in rates:
            for method in methods:
                r = run_one(method, rate, args.run_dir)
                ratio = byte_ratio(method, r["parameters"], frags)
                r["sim_byte_ratio"] = ratio
                r["predicted"] = predict(method, r["parameters"], r["compute_seconds_per_step"], rate, ratio,
                                         r["sync_events"])
                runs.append(r)
                print(f"{method:>22} {rate:>6g} Mbit/s: util {100 * r['measured_utilization']:5.1f} % "
                      f"(sim {100 * r['predicted']['utilization']:5.1f} %), wall {r['wall_seconds']:6.1f} s, "
                      f"payload/farsync {100 * r['payload_vs_farsync']:+.2f} %, "
                      f"eval {r['final_eval_loss']:.4f}", flush=True)
    except WanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = time.perf_counter() - t_start

    # simulated curves: each method's mean measured step time and its run's sync events
    grid = [10 ** (x / 20) for x in range(20, 61)]  # 10 … 1000 Mbit/s
    curves = {}
    for method in methods:
        pts = [r for r in runs if r["method"] == method]
        T = statistics.mean(r["compute_seconds_per_step"] for r in pts)
        curves[method] = (grid, [predict(method, pts[0]["parameters"], T, b, pts[0]["sim_byte_ratio"],
                                         pts[0]["sync_events"])["utilization"] for b in grid])

    def util(method, rate):
        return next(r["measured_utilization"] for r in runs if r["method"] == method and r["bandwidth_mbit"] == rate)

    dp_bound = [b for b in rates if "dp" in methods and util("dp", b) <= 0.30]
    fp4_ok = {f"{b:g}": util("streaming-overlap-fp4", b) >= 0.95 for b in dp_bound} \
        if "streaming-overlap-fp4" in methods else {}
    worst_bytes = max(abs(r["payload_vs_farsync"]) for r in runs)
    worst_sim = max(abs(r["measured_utilization"] - r["predicted"]["utilization"]) for r in runs)
    targets = {
        "fp4_overlap_ge_95_where_dp_le_30": {
            "bandwidths_where_dp_le_30_mbit": dp_bound, "fp4_at_least_95": fp4_ok,
            "met": bool(fp4_ok) and all(fp4_ok.values())},
        "kernel_vs_farsync_within_5pct": {
            "max_abs_payload_disagreement": worst_bytes,
            "max_wire_overhead_with_headers": max(r["wire_vs_farsync"] for r in runs),
            "met": worst_bytes <= 0.05},
        "simulator_within_5_points": {"max_abs_difference": worst_sim, "met": worst_sim <= 0.05},
    }
    out = {
        "benchmark": "wan",
        "date": DATE,
        "command": "flock /tmp/farsync-bench.lock python benchmarks/wan_bench.py",
        "total_seconds": total,
        "machine": machine(),
        "setup": {
            "hosts": 2, "model": "tiny", "parameters": runs[0]["parameters"], "layers": LAYERS,
            "fragment_parameters": frags, "steps": STEPS, "batch_size": 8, "seq_len": 128,
            "H": H, "streaming": {"P": 2, "fragment_pattern": "strided", "tau_overlap": 1, "alpha_overlap": 0.5},
            "link": "tbf on each host's eth0 (upload) and on its bridge port (download), burst max(2 frames, 1 ms), "
                    "queue 2000 ms, MTU 1500; latency not emulated (no netem)",
            "launch": "one `farsync train` process per network namespace, env:// rendezvous at host 0, gloo over TCP",
            "train_overrides": COMMON,
            "methods": {m: METHODS[m][0] for m in methods},
        },
        "simulator": {
            "inputs": "layers 4, the model's parameters, the run's measured compute seconds per step, M=2, H, P, "
                      "tau, codec, collective all-gather, schedule after-backward, latency 0, bandwidth = tbf rate "
                      "x payload_fraction x sim_byte_ratio; prediction for the run = S*T / (S*T + n_sync * "
                      "steady-state blocked seconds per sync)",
            "payload_fraction": PAYLOAD_FRACTION,
        },
        "runs": runs,
        "targets": targets,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "wan.json"), "w") as f:
        json.dump(out, f, indent=2)
    plot(runs, curves, os.path.join(args.out, "wan_utilization.png"))
    print(json.dumps(targets, indent=2))
    print(f"total {total:.0f} s; wrote {args.out}/wan.json and wan_utilization.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
