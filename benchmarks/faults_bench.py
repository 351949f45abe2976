"""Failures on emulated hosts: an elastic run in which workers are killed and restarted.

    python benchmarks/faults_bench.py [--failures 0 1 3 10] [--bandwidth 50] [--hosts 4]
        [--restart-delay 10] [--seed 0] [--steps 1560]

Four `farsync wan` hosts (network namespaces, tbf at 50 Mbit/s each way; latency cannot
be emulated on this kernel), a torchft Lighthouse (`farsync lighthouse`, default timeouts:
a worker silent for 5 s is counted out) on host 0, and one `farsync train
--elastic.enabled=true` worker per host: the default job (micro model, 1560 steps,
Streaming DiLoCo H = 20, P = 2, fp4) with τ = 0 (elastic runs sync with nothing else in
flight) and a local checkpoint every 100 steps. For each k, k SIGKILLs land at seeded
random moments between 10 % and 70 % of the fault-free run's training time (from its
first sync; counted from the first sync of each run), each on a random worker in
training (a restarted one counts once it has rejoined; a kill that would leave none in
training waits until another has rejoined, so θ_g always has a live holder); the
worker is started again `--restart-delay` seconds later (same
command: it resumes its own checkpoint and joins the others).

Measured per run: wall clock; syncs each worker contributed to; for each failure, the
time from the kill to the survivors' next sync, the time from the restart to the worker
taking part in a sync again, the rounds of its work lost (the round in progress at the
kill, plus any sync it missed while still training — 1 when nothing else is lost), the
bytes of the state it received; final eval loss (every worker alive at the end must hold
the same θ_g: "completed" checks it) vs k = 0.

Writes benchmarks/results/faults.json and faults.png. Needs root (namespaces).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from farsync.wan.launch import _pdeathsig_preexec  # noqa: E402
from farsync.wan.netns import HOST_IF, LinkSpec, Network, preflight  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "results")
LIGHTHOUSE_PORT = 29510


def worker_args(i: int, net: Network, run_dir: str, steps: int, checkpoint_every: int = 100) -> list[str]:
    return [
        "--algo.sync_delay=0", f"--train.steps={steps}", f"--train.checkpoint_every={checkpoint_every}",
        "--train.progress=false",
        f"--train.eval_every={steps}", f"--train.run_dir={run_dir}", "--train.name=run", "--elastic.enabled=true",
        f"--elastic.worker={i}", f"--elastic.lighthouse=http://{net.address(0)}:{LIGHTHOUSE_PORT}",
        f"--elastic.host={net.address(i)}",
    ]


class Fleet:
    """The lighthouse and one worker per host; workers can be killed and restarted."""

    def __init__(self, net: Network, run_dir: str, steps: int, checkpoint_every: int):
        self.net, self.run_dir, self.steps, self.checkpoint_every = net, run_dir, steps, checkpoint_every
        self.procs: dict[int, subprocess.Popen] = {}
        self.logs: list = []
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": HOST_IF}
        self.env = env
        self.lighthouse = self._spawn(0, [sys.executable, "-m", "farsync", "lighthouse",
                                          "--bind", f"0.0.0.0:{LIGHTHOUSE_PORT}"], "lighthouse")
        time.sleep(1.0)

    def _spawn(self, host: int, cmd: list[str], name: str) -> subprocess.Popen:
        log = open(os.path.join(self.run_dir, f"{name}-{time.monotonic_ns()}.log"), "w")
        self.logs.append(log)
        return subprocess.Popen(["ip", "netns", "exec", self.net.host_names[host], *cmd], stdout=log,
                                stderr=subprocess.STDOUT, env=self.env, preexec_fn=_pdeathsig_preexec())

    def start(self, i: int) -> None:
        cmd = [sys.executable, "-m", "farsync", "train",
               *worker_args(i, self.net, self.run_dir, self.steps, self.checkpoint_every)]
        self.procs[i] = self._spawn(i, cmd, f"worker-{i}")

    def kill(self, i: int) -> None:
        self.procs[i].send_signal(signal.SIGKILL)
        self.procs[i].wait()

    def up(self) -> list[int]:
        return [i for i, p in self.procs.items() if p.poll() is None]

    def close(self) -> None:
        for p in [*self.procs.values(), self.lighthouse]:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in self.logs:
            log.close()


def run_one(net: Network, failures: int, *, steps: int, restart_delay: float, horizon: float, seed: int,
            work: str, checkpoint_every: int = 100) -> dict:
    run_dir = os.path.join(work, f"k{failures}")
    os.makedirs(run_dir)
    rng = random.Random(seed * 1000 + failures)
    kill_at = sorted(rng.uniform(0.1, 0.7) * horizon for _ in range(failures))  # after training started
    fleet = Fleet(net, run_dir, steps, checkpoint_every)
    kills: list[dict] = []  # worker, time of kill, time of restart
    t0 = time.time()
    try:
        for i in range(net.hosts):
            fleet.start(i)
        pending = list(kill_at)
        restarts: list[tuple[float, int]] = []
        t_train = None  # when the first sync landed
        while True:
            if t_train is None:
                if any(r["kind"] == "sync" for i in range(net.hosts) for r in rows(run_dir, i)):
                    t_train = time.time()
                time.sleep(0.2)
                continue
            now = time.time() - t_train
            if pending and now >= pending[0]:
                # victims: workers in training (a restarted one once it has rejoined); at
                # least one other must stay in, holding θ_g: otherwise the kill waits
                training = [i for i in fleet.up() if i not in {k for _, k in restarts} and rejoined(run_dir, i, kills)]
                if len(training) > 1:
                    pending.pop(0)
                    victim = rng.choice(training)
                    fleet.kill(victim)
                    kills.append({"worker": victim, "killed": time.time(), "planned": t_train + kill_at[len(kills)]})
                    restarts.append((now + restart_delay, victim))
            for t, i in list(restarts):
                if now >= t:
                    restarts.remove((t, i))
                    fleet.start(i)
                    next(k for k in reversed(kills) if k["worker"] == i)["restarted"] = time.time()
            if not fleet.up() and not restarts:
                break
            if time.time() - t0 > 20 * horizon + 600:
                raise RuntimeError(f"k={failures}: the run did not finish")
            time.sleep(0.1)
        wall = time.time() - t0
        train_wall = time.time() - t_train
        codes = {i: p.returncode for i, p in fleet.procs.items()}
    finally:
        fleet.close()
    r = summarize(failures, run_dir, net.hosts, kills, wall, codes)
    r["train_wall_seconds"] = train_wall  # from the first sync on: the window the kills fall in
    return r


def rejoined(run_dir: str, i: int, kills: list[dict]) -> bool:
    """Worker i is training: never restarted, or rejoined since its last restart."""
    t = max((k.get("restarted", float("inf")) for k in kills if k["worker"] == i), default=None)
    return t is None or any(r["kind"] == "rejoined" and r["time"] > t for r in rows(run_dir, i))


def rows(run_dir: str, i: int) -> list[dict]:
    path = os.path.join(run_dir, "run", f"worker-{i}", "metrics.jsonl")
    return [json.loads(x) for x in open(path)] if os.path.exists(path) else []


def summarize(failures: int, run_dir: str, hosts: int, kills: list[dict], wall: float, codes: dict) -> dict:
    per = {i: rows(run_dir, i) for i in range(hosts)}
    summaries = {i: json.load(open(os.path.join(run_dir, "run", f"worker-{i}", "summary.json"))) for i in range(hosts)
                 if os.path.exists(os.path.join(run_dir, "run", f"worker-{i}", "summary.json"))}
    # every sync, as any worker saw it (all see the same; a restarted worker's file lacks what it missed)
    syncs: dict[tuple, dict] = {}
    for r in (r for rs in per.values() for r in rs if r["kind"] == "sync"):
        syncs.setdefault((r["step"], r["fragment"]), r)
    syncs_in_order = sorted(syncs.values(), key=lambda r: r["time"])
    losses = {s["final_eval_loss"] for s in summaries.values()}
    completed = all(c == 0 for c in codes.values()) and len(summaries) == hosts and len(losses) == 1
    detail = []
    for k in kills:
        w, t_kill = k["worker"], k["killed"]
        before = [s for s in syncs_in_order if s["time"] < t_kill]
        # since it last contributed, or (re)joined: the syncs it trained for and was not in
        joined = max((r["time"] for r in per[w] if r["kind"] == "rejoined" and r["time"] < t_kill), default=0.0)
        last_mine = max([s["time"] for s in before if w in s["kept"]] + [joined], default=0.0)
        missed = [s for s in before if s["time"] > last_mine and w not in s["kept"]]
        after = [s for s in syncs_in_order if s["time"] > t_kill]
        back = [r for r in per[w] if r["kind"] == "rejoined" and r["time"] > k.get("restarted", float("inf"))]
        detail.append({
            "worker": w,
            "kill_to_next_sync_seconds": (after[0]["time"] - t_kill) if after else None,
            "restart_to_sync_seconds": (back[0]["time"] - k["restarted"]) if back else None,
            "rounds_lost": 1 + len(missed),
            "state_bytes": back[0]["state_bytes"] if back else 0,
        })
    contributed = {i: sum(1 for s in syncs.values() if i in s["kept"]) for i in range(hosts)}
    rounds_per_fragment = len(syncs) / max(1, len({f for _, f in syncs}))
    return {
        "failures": failures,
        "completed": completed,
        "wall_seconds": wall,
        "eval_loss": losses.pop() if len(losses) == 1 else None,
        "eval_losses": sorted(s["final_eval_loss"] for s in summaries.values()),
        "rounds_lost_max": max((d["rounds_lost"] for d in detail), default=0),
        "detect_seconds_max": max((d["kill_to_next_sync_seconds"] or 0 for d in detail), default=0.0),
        "rejoin_seconds_max": max((d["restart_to_sync_seconds"] or 0 for d in detail), default=0.0),
        "recovery_bytes": sum(d["state_bytes"] for d in detail),
        "syncs": len(syncs),
        "rounds": rounds_per_fragment,
        "syncs_contributed": contributed,
        "exit_codes": codes,
        "kills": detail,
        "kill_delays_seconds": [k["killed"] - k["planned"] for k in kills],
    }


def plot(result: dict, path: str) -> None:
    runs = result["runs"]
    seeds = sorted({r["seed"] for r in runs})
    ks = sorted({r["failures"] for r in runs})
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    width = 0.8 / len(seeds)
    for j, seed in enumerate(seeds):
        mine = {r["failures"]: r for r in runs if r["seed"] == seed}
        xs = [i + j * width for i, k in enumerate(ks) if k in mine]
        axes[0].bar(xs, [mine[k]["wall_seconds"] for k in ks if k in mine], width, label=f"seed {seed}")
        axes[1].bar(xs, [mine[k]["eval_loss_vs_k0_pct"] or 0 for k in ks if k in mine], width, label=f"seed {seed}")
        for i, k in enumerate(ks):
            if k not in mine:
                continue
            det = [d["kill_to_next_sync_seconds"] for d in mine[k]["kills"] if d["kill_to_next_sync_seconds"] is not None]
            back = [d["restart_to_sync_seconds"] for d in mine[k]["kills"] if d["restart_to_sync_seconds"] is not None]
            first = i == 1 and j == 0
            axes[2].scatter([i + j * width] * len(det), det, marker="x", color="tab:red",
                            label="kill → survivors' next sync" if first else None)
            axes[2].scatter([i + j * width + 0.1] * len(back), back, marker="o", color="tab:green",
                            label="restart → back in a sync" if first else None)
    for ax in axes:
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ks))], [str(k) for k in ks])
        ax.set_xlabel("failures injected")
    axes[0].set(title="wall clock", ylabel="seconds")
    axes[1].axhline(1.0, color="grey", ls="--", lw=0.8)
    axes[1].set(title="final eval loss vs k = 0", ylabel="%")
    axes[2].set(title="recovery times", ylabel="seconds")
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    fig.suptitle(f"{result['hosts']} emulated hosts at {result['bandwidth_mbit']:g} Mbit/s, elastic (torchft), "
                 f"{result['steps']} steps, restart after {result['restart_delay_s']:g} s", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--failures", type=int, nargs="+", default=[0, 1, 3, 10])
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--bandwidth", type=float, default=50.0)
    ap.add_argument("--steps", type=int, default=1560)
    ap.add_argument("--restart-delay", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0, help="seeds the moments of the kills and the victims")
    ap.add_argument("--checkpoint-every", type=int, default=100,
                    help="the workers' local checkpoints (0: none; a restarted worker's inner optimizer starts fresh)")
    ap.add_argument("--out", default=os.path.join(OUT, "faults.json"))
    ap.add_argument("--append", action="store_true",
                    help="add this seed's runs to --out (replacing that seed's, if there)")
    ap.add_argument("--keep", action="store_true", help="keep the run directories and logs (printed)")
    args = ap.parse_args()
    if args.failures[0] != 0:
        ap.error("--failures must start with 0 (the fault-free run sets the time horizon and the loss to compare)")
    preflight()
    work = tempfile.mkdtemp(prefix="farsync-faults-")
    runs = []
    try:
        with Network(args.hosts, LinkSpec(args.bandwidth)) as net:
            horizon = 0.0
            for k in args.failures:
                r = run_one(net, k, steps=args.steps, restart_delay=args.restart_delay, horizon=horizon or 60.0,
                            seed=args.seed, work=work, checkpoint_every=args.checkpoint_every)
                r["seed"] = args.seed
                horizon = horizon or r["train_wall_seconds"]
                base = runs[0]["eval_loss"] if runs else r["eval_loss"]
                r["eval_loss_vs_k0_pct"] = 100 * (r["eval_loss"] / base - 1) if r["eval_loss"] and base else None
                runs.append(r)
                print(json.dumps({k: v for k, v in r.items() if k not in ("kills", "exit_codes")}), flush=True)
    finally:
        if args.keep:
            print(f"runs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.append and os.path.exists(args.out):
        old = json.load(open(args.out))
        for r in old["runs"]:
            r.setdefault("seed", old.get("seed"))  # files of one seed name it once
        runs = [r for r in old["runs"] if r["seed"] != args.seed] + runs
    result = {
        "benchmark": "faults", "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "hosts": args.hosts, "bandwidth_mbit": args.bandwidth, "steps": args.steps, "restart_delay_s": args.restart_delay,
        "checkpoint_every": args.checkpoint_every,
        "seeds": sorted({r["seed"] for r in runs}), "latency": "not emulated (no netem in this kernel)",
        "setup": "default job (micro, Streaming DiLoCo H=20 P=2 fp4) with tau=0, elastic on torchft; "
                 "lighthouse heartbeat timeout 5 s, join timeout 300 s; elastic.timeout_s 300, connect_timeout_s 15",
        "runs": runs,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.splitext(args.out)[0] + ".png")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
