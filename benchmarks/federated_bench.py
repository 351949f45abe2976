"""Federated pre-training on Flower over emulated hosts, beside all-to-all DiLoCo and DP.

    flock /tmp/farsync-bench.lock python benchmarks/federated_bench.py [--rounds 20]

Five `farsync wan`-style hosts (network namespaces on a private bridge, tbf on every link
both ways; latency cannot be emulated on this kernel): host 0 runs the SuperLink (TLS, only
registered client keys) and the ServerApp, hosts 1-4 one client each (a SuperNode).
Every link is 100 Mbit/s except client 3's, 10 Mbit/s; client 2 computes at half speed
(it sleeps as long as each step took). The job is the default one (micro model, 4 data
shards, a global batch of 16 sequences, 3,194,880 tokens = 20 tokens per parameter) as
`--rounds` rounds of H = 1560 / rounds inner steps, fp4-e3m0 both ways.

Beside it, on the same tokens, in one process (`farsync train`): the default all-to-all
Streaming DiLoCo (H 20, P 2, τ 1, fp4) and data-parallel (recipes/dp.toml), and DiLoCo with
the federation's own schedule (H = 1560 / rounds, fp4) to separate the cost of the schedule
from the cost of federating it.

Writes benchmarks/results/federated.json and federated.png. Needs root.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from farsync.federated.demo import Federation  # noqa: E402
from farsync.train.config import build_config  # noqa: E402
from farsync.wan.netns import HOST_IF, LinkSpec, Network, preflight  # noqa: E402
from wan_bench import machine  # noqa: E402  (benchmarks/ is on sys.path when this script runs)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results")
RUNS = os.path.join(ROOT, "benchmarks", "out", "federated")
STEPS = 1560
CLIENTS = 4
RATE, SLOW_LINK_RATE, SLOW_LINK, HALF_SPEED = 100.0, 10.0, 3, 2
PORT = 18400


def set_rate(net: Network, host: int, mbit: float) -> None:
    """Give one host another tbf rate, both ways."""
    spec = LinkSpec(mbit)
    ns = net.host_names[host]
    subprocess.run(["tc", "-n", ns, "qdisc", "replace", "dev", HOST_IF, "root", *spec.tbf_args()], check=True)
    subprocess.run(["tc", "-n", net.switch, "qdisc", "replace", "dev", f"b{host}", "root", *spec.tbf_args()], check=True)


def federated(rounds: int, H: int | None = None) -> dict:
    H = H or STEPS // rounds
    name = f"federated-{rounds}r-h{H}"
    run_dir = os.path.join(RUNS, name)
    subprocess.run(["rm", "-rf", run_dir], check=True)
    cfg = build_config(None, [f"--algo.workers={CLIENTS}", f"--algo.inner_steps={H}", "--algo.mode=diloco",
                              "--algo.fragments=1", "--algo.sync_delay=0", f"--train.steps={H * rounds}",
                              f"--federated.min_clients={CLIENTS}", "--federated.round_timeout_s=600",
                              f"--train.name={name}", f"--train.run_dir={RUNS}"])
    from farsync.data import Corpus

    Corpus.build(cfg.data, log=lambda m: None)  # once, before any process reads it
    preflight()
    net = Network(CLIENTS + 1, LinkSpec(RATE))
    fed = None
    try:
        net.create()
        set_rate(net, 1 + SLOW_LINK, SLOW_LINK_RATE)
        ns = net.host_names

        def prefix(who: str) -> list[str]:
            host = 0 if who == "server" else 1 + int(who.split("-")[1])
            return ["ip", "netns", "exec", ns[host]]

        fed = Federation(run_dir, port=PORT, host=net.address(0), prefix=prefix)
        for c in range(CLIENTS):
            fed.add_client(c, extra_node_config="speed=0.5" if c == HALF_SPEED else "",
                           env={"OMP_NUM_THREADS": "1"})
        t0 = time.time()
        fed.start(cfg)
        summary = fed.wait(4 * 3600, on_row=lambda r: print(
            f"round {r['round'] + 1}: {r['round_seconds']:.1f} s, train max {r['train_seconds_max']:.1f} s, kept {r['kept']}"
            + (f", eval {r['eval_loss']:.4f}" if "eval_loss" in r else ""), file=sys.stderr, flush=True))
        wall = time.time() - t0
    finally:
        if fed is not None:
            fed.stop()
        net.teardown()
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "rounds.jsonl"))]
    return {"run_dir": run_dir, "summary": summary, "rows": rows, "wall_seconds": wall, "inner_steps": H}


def train(name: str, overrides: list[str], recipe: str | None = None) -> dict:
    run_dir = os.path.join(RUNS, name)
    subprocess.run(["rm", "-rf", run_dir], check=True)
    cmd = [sys.executable, "-m", "farsync", "train", *([recipe] if recipe else []), *overrides,
           f"--train.name={name}", f"--train.run_dir={RUNS}", "--train.progress=false"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    s = json.load(open(os.path.join(run_dir, "summary.json")))
    evals = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl")) if '"eval"' in x]
    return {"summary": s, "evals": [(e["tokens"], e["eval_loss"]) for e in evals] + [(s["tokens"], s["final_eval_loss"])]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--long-rounds-steps", type=int, default=0,
                    help="Only measure the overhead: 3 rounds of this many inner steps (minute-long rounds); "
                         "adds 'overhead_long_rounds' to an existing federated.json.")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.long_rounds_steps:
        return long_rounds(args.long_rounds_steps, args.out)
    fed = federated(args.rounds)
    H = fed["inner_steps"]
    diloco = train("diloco", [])
    dp = train("dp", [], os.path.join(ROOT, "recipes", "dp.toml"))
    same = train(f"diloco-h{H}", ["--algo.mode=diloco", "--algo.fragments=1", "--algo.sync_delay=0",
                                  f"--algo.inner_steps={H}"])
    rows = fed["rows"]
    round_s = sum(r["round_seconds"] for r in rows)
    overhead = sum(r["overhead_seconds"] for r in rows)
    per_client = {}
    for r in rows:
        for c, secs in r["client_seconds"].items():
            d = per_client.setdefault(c, {"catch_up": 0.0, "train": 0.0, "encode_save": 0.0, "process": 0.0})
            for k in d:
                d[k] += float(secs.get(k, 0.0))
    tokens_per_round = CLIENTS * H * 4 * 128
    doc = {
        "date": datetime.date.today().isoformat(), "machine": machine(),
        "command": "flock /tmp/farsync-bench.lock python benchmarks/federated_bench.py",
        "setup": {"clients": CLIENTS, "rounds": args.rounds, "inner_steps": H, "rate_mbit": RATE,
                  "slow_link_client": SLOW_LINK, "slow_link_mbit": SLOW_LINK_RATE, "half_speed_client": HALF_SPEED,
                  "latency": "not emulated (no netem on this kernel)", "tls": True, "client_keys": True},
        "overhead_pct": 100 * overhead / round_s,
        "eval_loss": fed["summary"]["final_eval_loss"],
        "diloco_eval_loss": diloco["summary"]["final_eval_loss"],
        "dp_eval_loss": dp["summary"]["final_eval_loss"],
        "diloco_same_schedule_eval_loss": same["summary"]["final_eval_loss"],
        "rounds": args.rounds,
        "clients": fed["summary"]["clients"],
        "dp_bytes_per_worker": dp["summary"]["dp_equivalent_bytes_per_worker"],
        "diloco_bytes_per_worker": max(diloco["summary"]["bytes_sent_per_worker"]),
        "wall_seconds": {"federated": fed["wall_seconds"], "diloco_in_process": diloco["summary"]["wall_seconds"],
                         "dp_in_process": dp["summary"]["wall_seconds"]},
        "round_seconds_total": round_s, "overhead_seconds_total": overhead,
        "client_seconds_total": per_client,
        "curves": {
            "federated": [((r["round"] + 1) * tokens_per_round, r["eval_loss"]) for r in rows if "eval_loss" in r],
            "diloco": diloco["evals"], "dp": dp["evals"], f"diloco_h{H}": same["evals"],
        },
    }
    with open(os.path.join(args.out, "federated.json"), "w") as f:
        json.dump(doc, f, indent=2)
    plot(doc, os.path.join(args.out, "federated.png"))
    print(json.dumps({k: doc[k] for k in ("overhead_pct", "eval_loss", "diloco_eval_loss", "dp_eval_loss",
                                          "diloco_same_schedule_eval_loss")}, indent=2))
    return 0


def long_rounds(steps: int, out: str) -> int:
    """The overhead at rounds of ``steps`` inner steps (3 rounds; loss not compared)."""
    fed = federated(3, steps)
    rows = fed["rows"]
    path = os.path.join(out, "federated.json")
    with open(path) as f:
        doc = json.load(f)
    doc["overhead_long_rounds"] = {
        "inner_steps": steps, "rounds": len(rows),
        "round_seconds": [r["round_seconds"] for r in rows], "train_seconds_max": [r["train_seconds_max"] for r in rows],
        "overhead_pct": 100 * sum(r["overhead_seconds"] for r in rows) / sum(r["round_seconds"] for r in rows),
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
    print(json.dumps(doc["overhead_long_rounds"], indent=2))
    return 0


def plot(doc: dict, path: str) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    labels = {"federated": "federated (Flower, 4 clients)", "diloco": "Streaming DiLoCo all-to-all (H 20)",
              "dp": "data-parallel"}
    for k, pts in doc["curves"].items():
        if pts:
            a.plot([t / 1e6 for t, _ in pts], [v for _, v in pts], marker="o", ms=3, label=labels.get(k, k.replace("_", " ")))
    a.set_xlabel("tokens (M)")
    a.set_ylabel("eval loss")
    a.set_title("eval loss vs tokens")
    a.legend(fontsize=8)
    cs = doc["clients"]
    x = range(len(cs))
    b.bar([i - 0.2 for i in x], [c["bytes_up"] / 1e6 for c in cs], width=0.4, label="up")
    b.bar([i + 0.2 for i in x], [c["bytes_down"] / 1e6 for c in cs], width=0.4, label="down")
    b.axhline(doc["dp_bytes_per_worker"] / 1e6, color="grey", ls=":", label="DP, per worker")
    b.set_yscale("log")
    b.set_xticks(list(x), [f"client {c['id']}" for c in cs])
    b.set_ylabel("MB")
    b.set_title(f"bytes per client; Flower overhead {doc['overhead_pct']:.0f} % of a round")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
