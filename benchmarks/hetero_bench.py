"""Unequal workers: four workers of speeds 1, 1, 0.5, 0.25, three ways to share a round.

    python benchmarks/hetero_bench.py [--steps 600] [--seeds 0 1] [--real-steps 160]

Trains the default `micro` model and corpus (Streaming DiLoCo H = 20, P = 2, τ = 1, fp4,
recipes/default.toml otherwise) to the same token budget under each schedule:

- ``lockstep``: every worker takes every step; a round lasts as long as the slowest
  worker's H steps (4× the fastest's).
- ``steps``: each worker trains speed/fastest of the steps (H, H, H/2, H/4 per round),
  its pseudo-gradient weighted by the tokens it trained on; rounds last the fastest
  worker's H steps. It needs more steps for the same tokens.
- ``time-budget``: a worker trains a step only if it can finish it by that step's
  deadline (round_seconds / H apart) and sits out the steps it is late for.
- ``steps`` + garbage: worker 1's pseudo-gradient scaled by 1000 on the way out every
  round (it does not know); the receivers leave it out.

Two backends. In one process (two seeds; the loss figures) the workers share the CPU, so
``wall_seconds`` is the *simulated* wall clock of real workers of those speeds (the
measured mean compute of a step × 4 per step in lockstep, × 1 otherwise; exchanges not
included), and time-budget is simulated with constant speeds, where it trains exactly
the steps of ``steps``, placed at the end of each window. Under torchrun (4 processes on
this machine, a shorter budget: the wall clock is measured) a worker of relative speed v
sleeps (1/v − 1) × its compute after each step it trains; time-budget rounds last
round_seconds = 1.2 × H × the fastest worker's step time measured in the lockstep run.

Writes benchmarks/results/hetero.json and hetero.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from farsync.train.config import build_config  # noqa: E402
from farsync.train import train  # noqa: E402
from farsync.train.pacing import trained_steps  # noqa: E402

SPEEDS = [1.0, 1.0, 0.5, 0.25]
OUT = os.path.join(os.path.dirname(__file__), "results")


def overrides(name: str, schedule: str, steps: int, seed: int, tmp: str, fault: str, extra: list[str]) -> list[str]:
    over = [f"--algo.worker_speeds={','.join(map(str, SPEEDS))}", f"--algo.schedule={schedule}",
            f"--train.steps={steps}", f"--train.seed={seed}", f"--train.run_dir={tmp}",
            f"--train.name={name.replace(' ', '_').replace(',', '')}-{seed}", "--train.progress=false",
            f"--train.eval_every={steps}", f"--train.checkpoint_every={steps}", *extra]
    if fault:
        over += [f"--train.fault={fault}", "--train.faulty_worker=1"]
    return over


def record(name: str, schedule: str, steps: int, seed: int, s: dict, backend: str) -> dict:
    simulated = backend == "in-process"
    return {
        "name": name, "schedule": schedule, "seed": seed, "backend": backend, "completed": True,
        "wall_seconds": s["simulated_wall_seconds"] if simulated else s["wall_seconds"],
        "wall_clock": "simulated" if simulated else "measured", "real_seconds": s["wall_seconds"],
        "steps": steps, "tokens": s["tokens"], "eval_loss": s["final_eval_loss"],
        "excluded": len(s["exclusions"]), "per_worker": s["per_worker"],
        "bytes_sent_per_worker": s["bytes_sent_per_worker"],
    }


def run(name: str, schedule: str, steps: int, seed: int, tmp: str, fault: str = "", extra=()) -> dict:
    s = train(build_config(None, overrides(name, schedule, steps, seed, tmp, fault, list(extra))))
    return record(name, schedule, steps, seed, s, "in-process")


def run_torchrun(name: str, schedule: str, steps: int, seed: int, tmp: str, fault: str = "", extra=()) -> dict:
    over = overrides(name, schedule, steps, seed, tmp, fault, list(extra))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    subprocess.run([torchrun, "--standalone", f"--nproc-per-node={len(SPEEDS)}", "-m", "farsync", "train", *over],
                   check=True, capture_output=True, text=True, timeout=1800)
    run_dir = [a.split("=", 1)[1] for a in over if a.startswith("--train.name=")][0]
    with open(os.path.join(tmp, run_dir, "summary.json")) as f:
        return record(name, schedule, steps, seed, json.load(f), "torch.distributed")


def budget_steps(steps: int) -> int:
    """Schedule steps at which per-worker steps trains at least the lockstep run's tokens."""
    rel = [v / max(SPEEDS) for v in SPEEDS]
    return next(n for n in range(steps, 8 * steps) if sum(trained_steps(v, n) for v in rel) >= len(SPEEDS) * steps)


def summarize(runs: list[dict]) -> dict:
    out = {}
    for name in dict.fromkeys(r["name"] for r in runs):
        rs = [r for r in runs if r["name"] == name]
        out[name] = {"wall_seconds": sum(r["wall_seconds"] for r in rs) / len(rs),
                     "eval_loss": sum(r["eval_loss"] for r in rs) / len(rs),
                     "eval_losses": [r["eval_loss"] for r in rs], "tokens": rs[0]["tokens"],
                     "excluded": rs[0]["excluded"]}
    lock = out["lockstep"]
    for s in out.values():
        s["wall_saved"] = 1 - s["wall_seconds"] / lock["wall_seconds"]
        s["loss_cost"] = s["eval_loss"] / lock["eval_loss"] - 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600, help="lockstep steps in one process (the token budget)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--real-steps", type=int, default=160, help="lockstep steps under torchrun (0: skip)")
    args = ap.parse_args()
    steps_b = budget_steps(args.steps)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            runs.append(run("lockstep", "lockstep", args.steps, seed, tmp))
            runs.append(run("per-worker steps", "steps", steps_b, seed, tmp))
            runs.append(run("time-budget", "time-budget", steps_b, seed, tmp))
            runs.append(run("per-worker steps, worker 1 sends garbage", "steps", steps_b, seed, tmp, fault="scale:1000"))
        real = []
        if args.real_steps:
            rb = budget_steps(args.real_steps)
            lock = run_torchrun("lockstep", "lockstep", args.real_steps, 0, tmp)
            fastest = lock["per_worker"][0]
            step_s = fastest["compute_seconds"] / fastest["inner_steps"]
            round_s = round(1.2 * 20 * step_s, 3)
            real = [lock, run_torchrun("per-worker steps", "steps", rb, 0, tmp),
                    run_torchrun("time-budget", "time-budget", rb, 0, tmp, extra=[f"--algo.round_seconds={round_s}"]),
                    run_torchrun("per-worker steps, worker 1 sends garbage", "steps", rb, 0, tmp, fault="scale:1000")]
            real[2]["round_seconds"] = round_s
    result = {
        "benchmark": "hetero", "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch CPU",
        "speeds": SPEEDS, "model": "micro", "lockstep_steps": args.steps, "per_worker_steps": steps_b,
        "config": "streaming H=20 P=2 tau=1 fp4-e3m0, batch 4x128 per worker, recipes/default.toml otherwise",
        "summary": summarize(runs), "summary_torchrun": summarize(real) if real else None,
        "runs": runs + real,
    }
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "hetero.json"), "w") as f:
        json.dump(result, f, indent=1)
    fig, axes = plt.subplots(1, 2 if real else 1, figsize=(12 if real else 6.5, 4), squeeze=False)
    for ax, rs, title in [(axes[0][0], runs, "one process (simulated wall clock)"),
                          *([(axes[0][1], real, "torchrun, 4 processes (measured)")] if real else [])]:
        for name in dict.fromkeys(r["name"] for r in rs):
            ax.scatter([r["wall_seconds"] for r in rs if r["name"] == name],
                       [r["eval_loss"] for r in rs if r["name"] == name], label=name, s=40)
        ax.set_xlabel("wall clock to the token budget (s)")
        ax.set_ylabel("final eval loss")
        ax.set_title(f"{title}\nspeeds {SPEEDS}, {rs[0]['tokens']:,} tokens", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "hetero.png"), dpi=120)
    for label, summ in [("in-process", result["summary"]), ("torchrun", result["summary_torchrun"] or {})]:
        for name, s in summ.items():
            print(f"{label:10s} {name:42s} wall {s['wall_seconds']:7.1f} s ({s['wall_saved']:+.0%} saved)  "
                  f"loss {s['eval_loss']:.4f} ({s['loss_cost']:+.2%})  excluded {s['excluded']}")


if __name__ == "__main__":
    main()
