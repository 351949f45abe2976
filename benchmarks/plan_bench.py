"""Does the planner's choice hold on real links? `--algo.auto=true` on emulated hosts.

    flock /tmp/farsync-bench.lock python benchmarks/plan_bench.py [--hosts 2 4] [--bandwidths 10 20 50 200]

For every host count × tbf rate: `farsync wan` hosts (network namespaces, tbf on each
host's link both ways; latency cannot be emulated on this kernel), one `farsync train`
worker per host running the default job (micro model, 1560 steps, a global batch of 16
sequences split over the hosts) with `--algo.auto=true`: the workers measure the link and
their step time, the planner chooses H, P, τ and the codec inside the default safe region
(H 10-20, τ ≤ 1, every codec) for the default target (95 % compute utilization), and the
run trains with the choice.

Recorded per run: the measured link (rate, spread, round trip) beside the tbf setting,
the choice, the planner's predicted utilization beside the utilization the run measured
(farsync's compute seconds ÷ compute + blocked seconds, all workers), and bytes vs
data-parallel from the run's own accounting. Diagnostic, not a target: the prediction
re-made with the step time the run actually had (its compute seconds per step), which
separates an error in the link model from a step time that changed after the probe.

Writes benchmarks/results/plan.json and plan.png. Needs root (namespaces).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from farsync import sim  # noqa: E402
from farsync.plan.link import given_link  # noqa: E402
from farsync.plan.choose import SyncWait, _simulate  # noqa: E402
from farsync.wan import LinkSpec  # noqa: E402
from farsync.wan.run import run_wan  # noqa: E402
from wan_bench import machine  # noqa: E402  (benchmarks/ is on sys.path when this script runs)

OUT = os.path.join(os.path.dirname(__file__), "results")
RUNS = os.path.join(os.path.dirname(__file__), "out", "plan")
GLOBAL_BATCH = 16


def resimulate(plan: dict, step_time: float, hosts: int) -> float:
    """The planner's prediction for its chosen setting with another mean step time (the
    rehearsal's waits at syncs kept as measured)."""
    m, c, w = plan["model"], plan["chosen"], plan["sync_wait"]
    model = sim.ModelSpec(m["name"], m["layers"], m["params"], step_time)
    link = given_link(hosts, plan["link"]["measured_mbit"], plan["link"]["rtt_ms"])
    return _simulate(model, link, hosts, c["mode"], c["inner_steps"], c["fragments"], c["sync_delay"], c["codec"],
                     fragment_pattern="strided", exchange="auto", slow_start=plan["tcp_slow_start"],
                     waits=SyncWait(w["gap"], w["wait_s"]) if w else None).predicted_utilization


def run_one(hosts: int, mbit: float, steps: int) -> dict:
    name = f"auto-h{hosts}-{mbit:g}mbit"
    overrides = ["--algo.auto=true", f"--train.batch_size={GLOBAL_BATCH // hosts}", f"--train.steps={steps}",
                 f"--train.run_dir={RUNS}", f"--train.name={name}", "--train.progress=false"]
    report = run_wan(None, overrides, workers=hosts, link=LinkSpec(mbit), echo=False)
    run_dir = os.path.join(RUNS, name)
    with open(os.path.join(run_dir, "plan.json")) as f:
        plan = json.load(f)
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    c = plan["chosen"]
    step_run = summary["compute_seconds"] / summary["workers"] / summary["steps"]
    lo_mid_hi = plan["link"]["largest_size_mbit"]
    return {
        "hosts": hosts, "bandwidth_mbit": mbit,
        "measured_mbit": plan["link"]["measured_mbit"], "rtt_ms": plan["link"]["rtt_ms"],
        "chosen": {k: c[k] for k in ("mode", "inner_steps", "fragments", "sync_delay", "codec")},
        "target_utilization": plan["target_utilization"],
        "predicted_utilization": plan["predicted_utilization"],
        "measured_utilization": summary["compute_utilization"],
        "dp_bytes_ratio": summary["dp_bytes_ratio"],
        # beside the schema's fields
        "target_met_predicted": plan["target_met"],
        "measured_mbit_spread": lo_mid_hi,
        "tcp_payload_mbit_expected": mbit * 1448 / (1514 + 66 / 2),
        "fixed_ms": plan["link"]["fixed_s"] * 1e3, "idle_extra_ms": plan["link"]["idle_extra_s"] * 1e3,
        "probe_seconds": plan["link"]["probe_seconds"],
        "step_time_probe_s": plan["step_time_s"]["used"], "step_time_run_s": step_run,
        "predicted_with_run_step_time": resimulate(plan, step_run, hosts),
        "sync_wait_ms": plan["chosen"]["sync_wait_s"] * 1e3,
        "measured_blocked_per_sync_ms": 1e3 * summary["blocked_seconds"] / hosts / max(1, summary["sync_events"]),
        "predicted_dp_bytes_ratio": plan["predicted_dp_bytes_ratio"],
        "wall_seconds": summary["wall_seconds"], "final_eval_loss": summary["final_eval_loss"],
        "tcp_retrans_segs": report["tcp_retrans_segs"], "run_dir": run_dir,
    }


def plot(runs: list[dict], path: str) -> None:
    hosts = sorted({r["hosts"] for r in runs})
    low = 5 * math.floor(min(100 * min(r["measured_utilization"], r["predicted_utilization"]) for r in runs) / 5) - 5
    fig, axes = plt.subplots(1, len(hosts), figsize=(5.5 * len(hosts), 4.2), squeeze=False)
    for ax, h in zip(axes[0], hosts):
        rs = sorted((r for r in runs if r["hosts"] == h), key=lambda r: r["bandwidth_mbit"])
        x = [r["bandwidth_mbit"] for r in rs]
        ax.plot(x, [100 * r["measured_utilization"] for r in rs], "o-", label="measured")
        ax.plot(x, [100 * r["predicted_utilization"] for r in rs], "s--", label="predicted (plan)")
        ax.axhline(100 * rs[0]["target_utilization"], color="grey", lw=0.8, label="target")
        ax.axhline(100 * rs[0]["target_utilization"] - 3, color="grey", lw=0.8, ls=":", label="target − 3")
        for r in rs:
            c = r["chosen"]
            ax.annotate(f"H{c['inner_steps']} P{c['fragments']} τ{c['sync_delay']}\n{c['codec']}",
                        (r["bandwidth_mbit"], 100 * r["measured_utilization"]), fontsize=7,
                        textcoords="offset points", xytext=(0, -24), ha="center")
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{v:g}" for v in x])
        ax.set_ylim(low, 101)
        ax.set_xlabel("tbf rate per host, Mbit/s")
        ax.set_ylabel("compute utilization, %")
        ax.set_title(f"{h} hosts: --algo.auto=true (default job)", fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--bandwidths", type=float, nargs="+", default=[10, 20, 50, 200])
    ap.add_argument("--steps", type=int, default=1560)
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--replot", action="store_true", help="Redraw plan.png from the plan.json in --out; run nothing.")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.replot:
        with open(os.path.join(args.out, "plan.json")) as f:
            plot(json.load(f)["runs"], os.path.join(args.out, "plan.png"))
        return 0
    runs = []
    for h in args.hosts:
        for b in args.bandwidths:
            r = run_one(h, b, args.steps)
            runs.append(r)
            print(f"{h} hosts {b:g} Mbit/s: measured {r['measured_mbit']:.2f} Mbit/s, rtt {r['rtt_ms']:.3f} ms; "
                  f"chosen {r['chosen']}; utilization predicted {r['predicted_utilization']:.1%} measured "
                  f"{r['measured_utilization']:.1%} (re-predicted with the run's step time "
                  f"{r['predicted_with_run_step_time']:.1%}); {r['dp_bytes_ratio']:.0f}× fewer bytes than DP",
                  file=sys.stderr, flush=True)
    doc = {
        "date": datetime.date.today().isoformat(), "machine": machine(),
        "command": "flock /tmp/farsync-bench.lock python benchmarks/plan_bench.py",
        "job": f"default recipe, algo.workers = hosts, global batch {GLOBAL_BATCH} sequences, {args.steps} steps",
        "latency": "not emulated (no netem on this kernel): round trips are veth plus tbf queueing",
        "runs": runs,
        "worst_shortfall_points": max(100 * (r["target_utilization"] - r["measured_utilization"]) for r in runs),
        "worst_prediction_error_points": max(100 * abs(r["predicted_utilization"] - r["measured_utilization"])
                                             for r in runs),
    }
    with open(os.path.join(args.out, "plan.json"), "w") as f:
        json.dump(doc, f, indent=2)
    plot(runs, os.path.join(args.out, "plan.png"))
    print(json.dumps({k: doc[k] for k in ("worst_shortfall_points", "worst_prediction_error_points")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
