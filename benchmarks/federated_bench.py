"""Federated pre-training on Flower over emulated hosts, beside all-to-all DiLoCo and DP.

    python benchmarks/federated_bench.py [--rounds 78] [--fresh]

Five `farsync wan`-style hosts (network namespaces on a private bridge, tbf on every link
both ways; latency cannot be emulated on this kernel): host 0 runs the SuperLink (TLS, only
registered client keys) and the ServerApp, hosts 1-4 one client site each (a SuperNode and
its site trainer). Every link is 100 Mbit/s except client 3's, 10 Mbit/s; client 2 computes
at half speed (it sleeps as long as each step took). The job is the default one (micro
model, 4 data shards, a global batch of 16 sequences, 3,194,880 tokens = 20 tokens per
parameter) as `--rounds` rounds of H = 20 inner steps, fp4-e3m0 both ways.

Federations, each a stage:
- ``federated``: DiLoCo rounds (P = 1), with two faults: client 3's link goes down for 30 s
  a third of the way in (its reply is lost: the round ends at the adaptive deadline), and
  client 1's site trainer is SIGKILLed two thirds of the way in and started again;
- ``federated-streaming``: Streaming fragments, P = 2 (one fragment a round, τ = 0);
- ``federated-participation``: 2 of the 4 clients drawn per round;
- ``before``: ten rounds of the first on the code before the site trainer and the adaptive
  deadlines (a ClientApp process built the model and loaded its state for every message),
  for the per-round overhead before and after, on this machine.

Beside them, on the same tokens, in one process group (`farsync train`): the default
all-to-all Streaming DiLoCo (H 20, P 2, τ 1, fp4), data-parallel (recipes/dp.toml), and
each federation's own schedule all-to-all (DiLoCo H 20; Streaming H 20 P 2 τ 0; DiLoCo with
2 of 4 drawn per round), to separate the cost of a schedule from the cost of federating it.

Each stage runs under /tmp/farsync-bench.lock (so other jobs wait for it, and run between
stages) and keeps its result in benchmarks/out/federated/STAGE.json: an interrupted run
starts again where it stopped (``--fresh``: every stage again). Writes
benchmarks/results/federated.json and federated.png. Needs root.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import statistics
import subprocess
import sys
import threading
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
PARTICIPATION = 2  # clients per round in the partial-participation run
BEFORE = "5d540c7^"  # the code before the site trainer and the adaptive deadlines
BEFORE_ROUNDS = 10
LOCK = "/tmp/farsync-bench.lock"


def set_rate(net: Network, host: int, mbit: float) -> None:
    """Give one host another tbf rate, both ways."""
    spec = LinkSpec(mbit)
    ns = net.host_names[host]
    subprocess.run(["tc", "-n", ns, "qdisc", "replace", "dev", HOST_IF, "root", *spec.tbf_args()], check=True)
    subprocess.run(["tc", "-n", net.switch, "qdisc", "replace", "dev", f"b{host}", "root", *spec.tbf_args()], check=True)


def federated(name: str, rounds: int, H: int, extra: list[str] = (), faults: tuple = ()) -> dict:
    """One federation of ``rounds`` rounds of H steps over the emulated hosts. ``faults``:
    ("link", client, round, seconds) takes that client's link down for ``seconds`` early in
    ``round``; ("trainer", client, round) SIGKILLs its trainer 2 s into ``round`` and starts
    it again at once (from its saved state)."""
    run_dir = os.path.join(RUNS, name)
    subprocess.run(["rm", "-rf", run_dir], check=True)
    cfg = build_config(None, [f"--algo.workers={CLIENTS}", f"--algo.inner_steps={H}", "--algo.mode=diloco",
                              "--algo.fragments=1", "--algo.sync_delay=0", *extra, f"--train.steps={H * rounds}",
                              f"--federated.min_clients={CLIENTS}", "--federated.round_timeout_s=600",
                              f"--train.name={name}", f"--train.run_dir={RUNS}"])
    from farsync.data import Corpus

    Corpus.build(cfg.data, log=lambda m: None)  # once, before any process reads it
    preflight()
    net = Network(CLIENTS + 1, LinkSpec(RATE))
    fed = None
    done: list[dict] = []  # what each fault did, when
    threads = []
    try:
        net.create()
        set_rate(net, 1 + SLOW_LINK, SLOW_LINK_RATE)
        ns = net.host_names

        def prefix(who: str) -> list[str]:
            host = 0 if who == "server" else 1 + int(who.split("-")[1])
            return ["ip", "netns", "exec", ns[host]]

        def inject(fault):
            kind, client, r = fault[:3]
            if kind == "link":
                time.sleep(0.5)
                port = f"b{1 + client}"
                subprocess.run(["ip", "-n", net.switch, "link", "set", port, "down"], check=True)
                done.append({"fault": "link down", "client": client, "round": r, "seconds": fault[3], "at": time.time()})
                time.sleep(fault[3])
                subprocess.run(["ip", "-n", net.switch, "link", "set", port, "up"], check=True)
            else:
                time.sleep(2.0)
                fed.kill_trainer(client)
                done.append({"fault": "trainer SIGKILL", "client": client, "round": r, "at": time.time()})
                fed.start_trainer(client)
                done[-1]["restarted_after_s"] = time.time() - done[-1]["at"]

        def on_row(row):
            print(f"{name} round {row['round'] + 1}: {row['round_seconds']:.1f} s, train max "
                  f"{row['train_seconds_max']:.1f} s, kept {row['kept']}" + (f", failed {row['failed']}" if row["failed"] else "")
                  + (f", eval {row['eval_loss']:.4f}" if "eval_loss" in row else ""), file=sys.stderr, flush=True)
            for f in faults:
                if f[2] == row["round"] + 1:  # the next round has begun
                    t = threading.Thread(target=inject, args=(f,), daemon=True)
                    t.start()
                    threads.append(t)

        fed = Federation(run_dir, port=PORT, host=net.address(0), prefix=prefix)
        for c in range(CLIENTS):
            fed.add_client(c, extra_node_config="speed=0.5" if c == HALF_SPEED else "",
                           env={"OMP_NUM_THREADS": "1"})
        t0 = time.time()
        fed.start(cfg)
        summary = fed.wait(4 * 3600, on_row=on_row)
        wall = time.time() - t0
        for t in threads:
            t.join()
    finally:
        if fed is not None:
            fed.stop()
        net.teardown()
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "rounds.jsonl"))]
    for d in done:
        d["at"] -= t0
    return {"run_dir": run_dir, "summary": summary, "rows": rows, "wall_seconds": wall, "inner_steps": H,
            "faults": done}


def train(name: str, overrides: list[str], recipe: str | None = None) -> dict:
    run_dir = os.path.join(RUNS, name)
    subprocess.run(["rm", "-rf", run_dir], check=True)
    cmd = [sys.executable, "-m", "farsync", "train", *([recipe] if recipe else []), *overrides,
           f"--train.name={name}", f"--train.run_dir={RUNS}", "--train.progress=false"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    s = json.load(open(os.path.join(run_dir, "summary.json")))
    evals = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl")) if '"eval"' in x]
    return {"summary": s, "evals": [(e["tokens"], e["eval_loss"]) for e in evals] + [(s["tokens"], s["final_eval_loss"])]}


def stage(name: str, fn, fresh: bool):
    """``fn()``'s result, run under the benchmark lock (one stage at a time, so that other
    jobs on the machine run between stages, never during one) and kept in
    benchmarks/out/federated/NAME.json: a stage that finished is not run again unless
    ``fresh``."""
    path = os.path.join(RUNS, f"{name}.json")
    if not fresh and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    os.makedirs(RUNS, exist_ok=True)
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        print(f"stage {name} ...", file=sys.stderr, flush=True)
        out = fn()
    with open(path, "w") as f:
        json.dump(out, f)
    return out


def before(rounds: int, H: int) -> dict:
    """The same federation on the code before the site trainer and the adaptive deadlines
    (``BEFORE``: a fresh ClientApp process built the model and loaded its state for every
    message; a fixed deadline), ``rounds`` rounds, on this machine: its per-round overhead."""
    src = os.path.join(RUNS, "before-src")
    subprocess.run(["rm", "-rf", src], check=True)
    os.makedirs(src)
    archive = subprocess.run(["git", "-C", ROOT, "archive", BEFORE], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
    env = dict(os.environ, PYTHONPATH=os.path.join(src, "src"))  # every Flower process imports that farsync
    code = ("import json, sys; sys.path.insert(0, 'benchmarks'); import federated_bench as b; "
            f"r = b.federated({rounds}, {H}); print(json.dumps({{'rows': r['rows'], 'wall_seconds': r['wall_seconds']}}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=src, env=env, check=True, capture_output=True, text=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    subprocess.run(["rm", "-rf", src], check=True)
    return got


def curve(rows: list[dict]) -> list[tuple[int, float]]:
    """(tokens trained so far, eval loss) at the rounds that evaluated."""
    out, tokens = [], 0
    for r in rows:
        tokens += r["tokens"]
        if "eval_loss" in r:
            out.append((tokens, r["eval_loss"]))
    return out


def peak_bytes(rows: list[dict]) -> dict:
    """The most bytes one client moved in one round: up, down, and both together."""
    up = [n for r in rows for n in r["bytes_up"].values()]
    down = [n for r in rows for n in r["bytes_down"].values()]
    both = [r["bytes_up"][c] + r["bytes_down"][c] for r in rows for c in r["bytes_up"] if c in r["bytes_down"]]
    return {"up": max(up), "down": max(down), "up_and_down": max(both)}


def overheads(rows: list[dict]) -> dict:
    """Medians over the rounds in which every chosen client replied: the round, its
    slowest training, what lies outside training, and how that splits into the time
    outside the ClientApp (Flower: the SuperNode finding the message — it polls every 3 s
    when it found none — starting a ClientApp process, the transfers both ways, the
    SuperNode's 0.5 s wait for the reply) and inside it (the relay, the channel, the
    trainer's catch-up, encode and save), taken at the client whose reply came last."""
    full = [r for r in rows if not r["failed"]]
    last = []
    for r in full:
        cs = r["client_seconds"]
        slow = max(cs, key=lambda c: cs[c].get("process", 0.0))  # the ClientApp that took longest
        last.append((r["round_seconds"] - cs[slow].get("process", 0.0),
                     cs[slow].get("process", 0.0) - cs[slow].get("train", 0.0)))
    med = statistics.median
    return {"rounds": len(full), "round_seconds": med(r["round_seconds"] for r in full),
            "train_seconds_max": med(r["train_seconds_max"] for r in full),
            "overhead_seconds": med(r["overhead_seconds"] for r in full),
            "outside_clientapp_seconds": med(a for a, _ in last), "clientapp_not_training_seconds": med(b for _, b in last)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=STEPS // 20, help="rounds of H = 20 (default: the job's 1,560 steps)")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--fresh", action="store_true", help="run every stage again (default: reuse finished ones)")
    ap.add_argument("--before-rounds", type=int, default=BEFORE_ROUNDS, help="rounds of the code before")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    H, rounds, fresh = 20, args.rounds, args.fresh
    same = ["--algo.mode=diloco", "--algo.fragments=1", "--algo.sync_delay=0", f"--algo.inner_steps={H}"]
    stream = ["--algo.mode=streaming", "--algo.fragments=2", "--algo.sync_delay=0", f"--algo.inner_steps={H}"]
    part = [f"--algo.participation={PARTICIPATION}"]
    # a lost reply (client 3's link down for 30 s) and a site trainer SIGKILLed mid-round
    faults = (("link", SLOW_LINK, rounds // 3, 30.0), ("trainer", 1, 2 * rounds // 3))
    fed = stage("federated", lambda: federated("federated", rounds, H, faults=faults), fresh)
    fed2 = stage("federated-streaming", lambda: federated("federated-streaming", rounds, H, stream), fresh)
    fedk = stage("federated-participation", lambda: federated("federated-participation", rounds, H, part), fresh)
    old = stage("before", lambda: before(args.before_rounds, H), fresh)
    steps = [f"--train.steps={H * rounds}"]
    diloco = stage("diloco", lambda: train("diloco", steps), fresh)
    dp = stage("dp", lambda: train("dp", steps, os.path.join(ROOT, "recipes", "dp.toml")), fresh)
    same_run = stage("diloco-same", lambda: train("diloco-same", [*same, *steps]), fresh)
    stream_run = stage("streaming-same", lambda: train("streaming-same", [*stream, *steps]), fresh)
    part_run = stage("participation-same", lambda: train("participation-same", [*same, *part, *steps]), fresh)

    rows = fed["rows"]
    round_s = sum(r["round_seconds"] for r in rows)
    overhead = sum(r["overhead_seconds"] for r in rows)
    per_client = {}
    for r in rows:
        for c, secs in r["client_seconds"].items():
            d = per_client.setdefault(c, {"catch_up": 0.0, "train": 0.0, "encode_save": 0.0, "process": 0.0})
            for k in d:
                d[k] += float(secs.get(k, 0.0))
    lost = [r for r in rows if any("no reply by" in why for why in r["failed"].values())]
    killed = [r for r in rows if r["failed"] and r not in lost]
    oh = overheads(rows)
    p1 = peak_bytes(rows)
    p2 = peak_bytes(fed2["rows"])
    doc = {
        "date": datetime.date.today().isoformat(), "machine": machine(),
        "command": "python benchmarks/federated_bench.py  (takes /tmp/farsync-bench.lock around each stage)",
        "setup": {"clients": CLIENTS, "rounds": rounds, "inner_steps": H, "rate_mbit": RATE,
                  "slow_link_client": SLOW_LINK, "slow_link_mbit": SLOW_LINK_RATE, "half_speed_client": HALF_SPEED,
                  "latency": "not emulated (no netem on this kernel)", "tls": True, "client_keys": True,
                  "site_trainer": True, "deadline": "adaptive (federated.deadline_factor 3, window 5, floor 10 s)",
                  "faults": fed["faults"]},
        "overhead_seconds_per_round": oh["overhead_seconds"],
        "overhead": {"after": oh, "before": {**overheads(old["rows"]), "code": BEFORE}},
        "lost_reply_round_seconds": lost[0]["round_seconds"] if lost else None,
        "lost_reply": [{"round": r["round"], "round_seconds": r["round_seconds"], "deadline_seconds": r["deadline_seconds"],
                        "failed": r["failed"]} for r in lost],
        "trainer_killed": [{"round": r["round"], "round_seconds": r["round_seconds"], "failed": r["failed"]}
                           for r in killed],
        "overhead_pct": 100 * overhead / round_s,
        "eval_loss": fed["summary"]["final_eval_loss"],
        "diloco_eval_loss": diloco["summary"]["final_eval_loss"],
        "dp_eval_loss": dp["summary"]["final_eval_loss"],
        "diloco_same_schedule_eval_loss": same_run["summary"]["final_eval_loss"],
        "streaming": {"fragments": 2, "eval_loss": fed2["summary"]["final_eval_loss"],
                      "all_to_all_eval_loss": stream_run["summary"]["final_eval_loss"],
                      "all_to_all_default_eval_loss": diloco["summary"]["final_eval_loss"],
                      "peak_bytes_per_round": p2["up_and_down"], "peak_bytes": p2,
                      "fragments_1_peak_bytes_per_round": p1["up_and_down"], "fragments_1_peak_bytes": p1,
                      "rounds": fed2["summary"]["rounds"], "wall_seconds": fed2["wall_seconds"],
                      "overhead": overheads(fed2["rows"]), "clients": fed2["summary"]["clients"]},
        "participation": {"per_round": PARTICIPATION, "eval_loss": fedk["summary"]["final_eval_loss"],
                          "in_process_eval_loss": part_run["summary"]["final_eval_loss"],
                          "kept": [r["kept"] for r in fedk["rows"]], "wall_seconds": fedk["wall_seconds"],
                          "overhead": overheads(fedk["rows"]), "clients": fedk["summary"]["clients"]},
        "rounds": rounds,
        "clients": fed["summary"]["clients"],
        "dp_bytes_per_worker": dp["summary"]["dp_equivalent_bytes_per_worker"],
        "diloco_bytes_per_worker": max(diloco["summary"]["bytes_sent_per_worker"]),
        "wall_seconds": {"federated": fed["wall_seconds"], "diloco_in_process": diloco["summary"]["wall_seconds"],
                         "dp_in_process": dp["summary"]["wall_seconds"]},
        "round_seconds_total": round_s, "overhead_seconds_total": overhead,
        "client_seconds_total": per_client,
        "curves": {
            "federated": curve(rows), "federated_streaming": curve(fed2["rows"]),
            "federated_participation": curve(fedk["rows"]),
            "diloco": diloco["evals"], "dp": dp["evals"], f"diloco_h{H}": same_run["evals"],
            "streaming_h20_tau0": stream_run["evals"],
        },
    }
    with open(os.path.join(args.out, "federated.json"), "w") as f:
        json.dump(doc, f, indent=2)
    plot(doc, os.path.join(args.out, "federated.png"))
    print(json.dumps({k: doc[k] for k in ("overhead_seconds_per_round", "lost_reply_round_seconds", "eval_loss",
                                          "diloco_same_schedule_eval_loss", "streaming")}, indent=2, default=str))
    return 0


def plot(doc: dict, path: str) -> None:
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    labels = {"federated": "federated P 1 (Flower, 4 clients, 2 faults)", "federated_streaming": "federated P 2",
              "federated_participation": "federated, 2 of 4 per round", "diloco": "Streaming DiLoCo all-to-all (τ 1)",
              "dp": "data-parallel", "streaming_h20_tau0": "Streaming all-to-all, τ 0"}
    for k, pts in doc["curves"].items():
        if pts:
            a.plot([t / 1e6 for t, _ in pts], [v for _, v in pts], marker="o", ms=2,
                   label=labels.get(k, k.replace("_", " ")))
    a.set_xlabel("tokens (M)")
    a.set_ylabel("eval loss")
    a.set_ylim(top=3.0)
    a.set_title("eval loss vs tokens")
    a.legend(fontsize=7)
    oh = doc["overhead"]
    names = ["before", "after"]
    parts = [("train_seconds_max", "slowest training"), ("clientapp_not_training_seconds", "in the ClientApp, not training"),
             ("outside_clientapp_seconds", "outside the ClientApp (Flower)")]
    bottom = [0.0, 0.0]
    for key, label in parts:
        v = [oh[n][key] for n in names]
        b.bar(names, v, bottom=bottom, label=label)
        bottom = [x + y for x, y in zip(bottom, v)]
    b.set_ylabel("seconds (median round, H 20)")
    b.set_title("a round, before and after the site trainer")
    b.legend(fontsize=7)
    st = doc["streaming"]
    runs = [("P 1", st["fragments_1_peak_bytes"]), ("P 2", st["peak_bytes"])]
    x = range(len(runs))
    c.bar([i - 0.2 for i in x], [p["up"] / 1e3 for _, p in runs], width=0.4, label="up")
    c.bar([i + 0.2 for i in x], [p["down"] / 1e3 for _, p in runs], width=0.4, label="down")
    c.set_xticks(list(x), [n for n, _ in runs])
    c.set_ylabel("kB, most one client moved in one round")
    c.set_title("peak bytes per round: federated fragments")
    c.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
