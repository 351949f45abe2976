"""Unequal workers: four workers of speeds 1, 1, 0.5, 0.25, three ways to share a round.

    python benchmarks/hetero_bench.py [--steps 600] [--seeds 0 1]

Runs `farsync train` in one process (simulated workers, the default `micro` model and
corpus, Streaming DiLoCo H = 20, P = 2, fp4) to the same token budget:

- ``lockstep``: every worker takes every step; a round lasts as long as the slowest
  worker's H steps (4× the fastest's).
- ``steps``: each worker trains speed/fastest of the steps (H, H, H/2, H/4 per round),
  its pseudo-gradient weighted by the tokens it trained on; rounds last the fastest
  worker's H steps. It needs more steps for the same tokens.
- ``steps`` + garbage: the same, with worker 1's pseudo-gradient scaled by 1000 on the
  way out every round (it does not know); the receivers leave it out.

Wall clock: in one process the workers share the CPU, so ``wall_seconds`` is the
*simulated* wall clock of real workers of those speeds (the measured mean compute of a
step × 4 per step in lockstep, × 1 with per-worker steps; exchanges not included: on a
fast link they are hidden by the overlap). ``real_seconds`` is what this machine took.

Writes benchmarks/results/hetero.json and hetero.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from farsync.train.config import build_config  # noqa: E402
from farsync.train.loop import train, trained_steps  # noqa: E402

SPEEDS = [1.0, 1.0, 0.5, 0.25]
OUT = os.path.join(os.path.dirname(__file__), "results")


def run(name: str, schedule: str, steps: int, seed: int, tmp: str, fault: str = "") -> dict:
    over = [f"--algo.worker_speeds={','.join(map(str, SPEEDS))}", f"--algo.schedule={schedule}",
            f"--train.steps={steps}", f"--train.seed={seed}", f"--train.run_dir={tmp}",
            f"--train.name={name}-{seed}", "--train.progress=false", f"--train.eval_every={steps}",
            f"--train.checkpoint_every={steps}"]
    if fault:
        over += [f"--train.fault={fault}", "--train.faulty_worker=1"]
    s = train(build_config(None, over))
    return {
        "name": name, "schedule": schedule, "seed": seed, "completed": True,
        "wall_seconds": s["simulated_wall_seconds"], "wall_clock": "simulated", "real_seconds": s["wall_seconds"],
        "steps": steps, "tokens": s["tokens"], "eval_loss": s["final_eval_loss"],
        "excluded": len(s["exclusions"]), "per_worker": s["per_worker"],
        "bytes_sent_per_worker": s["bytes_sent_per_worker"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600, help="lockstep steps (the token budget)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    rel = [v / max(SPEEDS) for v in SPEEDS]
    budget = len(SPEEDS) * args.steps
    # per-worker steps: enough schedule steps to train on at least the same tokens
    steps_b = next(n for n in range(args.steps, 4 * args.steps) if sum(trained_steps(v, n) for v in rel) >= budget)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            runs.append(run("lockstep", "lockstep", args.steps, seed, tmp))
            runs.append(run("per-worker steps", "steps", steps_b, seed, tmp))
            runs.append(run("per-worker steps, worker 1 sends garbage", "steps", steps_b, seed, tmp, fault="scale:1000"))
            print(json.dumps(runs[-3:], indent=1)[:2000], flush=True)
    summary = {}
    for name in dict.fromkeys(r["name"] for r in runs):
        rs = [r for r in runs if r["name"] == name]
        summary[name] = {"wall_seconds": sum(r["wall_seconds"] for r in rs) / len(rs),
                         "eval_loss": sum(r["eval_loss"] for r in rs) / len(rs),
                         "eval_losses": [r["eval_loss"] for r in rs], "tokens": rs[0]["tokens"]}
    lock = summary["lockstep"]
    for s in summary.values():
        s["wall_saved"] = 1 - s["wall_seconds"] / lock["wall_seconds"]
        s["loss_cost"] = s["eval_loss"] / lock["eval_loss"] - 1
    result = {
        "benchmark": "hetero", "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch CPU (in-process simulation)",
        "speeds": SPEEDS, "model": "micro", "lockstep_steps": args.steps, "per_worker_steps": steps_b,
        "config": "streaming H=20 P=2 tau=1 fp4-e3m0, batch 4x128 per worker, recipes/default.toml otherwise",
        "not_run": "time-budget schedule (not implemented yet); real processes under farsync wan",
        "summary": summary, "runs": runs,
    }
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "hetero.json"), "w") as f:
        json.dump(result, f, indent=1)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, s in summary.items():
        ax.scatter([r["wall_seconds"] for r in runs if r["name"] == name],
                   [r["eval_loss"] for r in runs if r["name"] == name], label=name, s=40)
    ax.set_xlabel("simulated wall clock to the token budget (s)")
    ax.set_ylabel("final eval loss")
    ax.set_title(f"speeds {SPEEDS}, {lock['tokens']:,} tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "hetero.png"), dpi=120)
    for name, s in summary.items():
        print(f"{name:45s} wall {s['wall_seconds']:7.1f} s ({s['wall_saved']:+.0%} saved)  "
              f"loss {s['eval_loss']:.4f} ({s['loss_cost']:+.2%})")


if __name__ == "__main__":
    main()
