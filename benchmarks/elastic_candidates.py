"""Which engine should carry elastic runs? torchrun elastic vs torchft, on emulated hosts.

    python benchmarks/elastic_candidates.py [--hosts 4] [--bandwidth 50]

torchrun elastic (c10d rendezvous, ``--nnodes=1:H --max-restarts``): one agent per
`farsync wan` host, each running a probe worker that sums a tensor over all workers every
0.25 s and logs when. One worker process is SIGKILLed; measured: the time until every
worker is summing again (torchrun restarts *every* worker on a membership change, so the
survivors lose what they held in memory), and how many of them were restarted. Then the
whole host (agent and worker) is killed: the time until the others sum again without it.

torchft's figures for the same events come from benchmarks/faults_bench.py (survivors are
not restarted; see BENCHMARKS.md, "Failures").

Writes benchmarks/results/elastic_candidates.json. Needs root (namespaces).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from farsync.wan.launch import _pdeathsig_preexec
from farsync.wan.netns import HOST_IF, LinkSpec, Network, preflight

OUT = os.path.join(os.path.dirname(__file__), "results")
PROBE = '''
import json, os, sys, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
r, n = dist.get_rank(), dist.get_world_size()
host = os.environ["PROBE_HOST"]
out = open(os.path.join(os.environ["PROBE_DIR"], f"probe-{host}-{os.getpid()}.jsonl"), "a", buffering=1)
t = torch.ones(1)
while True:
    dist.all_reduce(t)
    out.write(json.dumps({"host": host, "pid": os.getpid(), "rank": r, "world": n, "time": time.time(),
                          "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))}) + "\\n")
    time.sleep(0.25)
'''


def probe_rows(d: str) -> list[dict]:
    rows = []
    for f in glob.glob(os.path.join(d, "probe-*.jsonl")):
        rows += [json.loads(x) for x in open(f) if x.strip()]
    return rows


def worker_pid(d: str, host: int) -> int | None:
    rows = [r for r in probe_rows(d) if r["host"] == str(host)]
    return rows[-1]["pid"] if rows else None


def all_summing(d: str, after: float, world: int) -> float | None:
    """The first time after ``after`` by which every one of ``world`` hosts summed with a
    world of ``world`` (None if not yet)."""
    rows = [r for r in probe_rows(d) if r["time"] > after and r["world"] == world]
    firsts = {}
    for r in sorted(rows, key=lambda r: r["time"]):
        firsts.setdefault(r["host"], r["time"])
    return max(firsts.values()) if len(firsts) == world else None


def torchrun_case(net: Network, work: str, kill_node: bool, wait_s: float) -> dict:
    d = os.path.join(work, "node" if kill_node else "worker")
    os.makedirs(d)
    probe = os.path.join(d, "probe.py")
    open(probe, "w").write(PROBE)
    agents = []
    for i in range(net.hosts):
        env = {**os.environ, "PROBE_HOST": str(i), "PROBE_DIR": d, "GLOO_SOCKET_IFNAME": HOST_IF, "PYTHONUNBUFFERED": "1"}
        conf = ["--rdzv-conf", "is_host=true"] if i == 0 else []
        cmd = ["ip", "netns", "exec", net.host_names[i], sys.executable, "-m", "torch.distributed.run",
               f"--nnodes=1:{net.hosts}", "--nproc-per-node=1", "--rdzv-backend=c10d",
               f"--rdzv-endpoint={net.address(0)}:29400", "--rdzv-id=candidates", "--max-restarts=5",
               "--monitor-interval=1", f"--local-addr={net.address(i)}", *conf, probe]
        agents.append(subprocess.Popen(cmd, env=env, stdout=open(os.path.join(d, f"agent-{i}.log"), "w"),
                                       stderr=subprocess.STDOUT, preexec_fn=_pdeathsig_preexec(), start_new_session=True))
    try:
        deadline = time.time() + 180
        while all_summing(d, 0, net.hosts) is None:
            if time.time() > deadline:
                raise RuntimeError(f"torchrun workers never all started; logs in {d}")
            time.sleep(0.5)
        time.sleep(3)
        victim = net.hosts - 1
        pid = worker_pid(d, victim)
        t_kill = time.time()
        if kill_node:  # the agent and its worker (in a process group of its own): the host is gone
            os.killpg(agents[victim].pid, signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)
        world = net.hosts - 1 if kill_node else net.hosts
        t_back = None
        while time.time() < t_kill + wait_s:
            t_back = all_summing(d, t_kill, world)
            if t_back is not None:
                break
            time.sleep(0.5)
        restarted = sorted({r["host"] for r in probe_rows(d) if r["time"] > t_kill and r["restart"] > 0})
        return {"engine": "torchrun elastic (c10d)", "event": "host killed" if kill_node else "worker process killed",
                "seconds_until_all_working": None if t_back is None else t_back - t_kill,
                "workers_restarted": len(restarted), "survivors_restarted": len([h for h in restarted if h != str(victim)])}
    finally:
        for a in agents:
            try:
                os.killpg(a.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            a.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--bandwidth", type=float, default=50.0)
    ap.add_argument("--out", default=os.path.join(OUT, "elastic_candidates.json"))
    ap.add_argument("--wait", type=float, default=300.0, help="give up on a recovery after this many seconds")
    ap.add_argument("--keep", action="store_true", help="keep the agents' logs (printed)")
    args = ap.parse_args()
    preflight()
    work = tempfile.mkdtemp(prefix="farsync-candidates-")
    cases = []
    try:
        for kill_node in (False, True):
            with Network(args.hosts, LinkSpec(args.bandwidth)) as net:
                c = torchrun_case(net, work, kill_node, args.wait)
                print(json.dumps(c), flush=True)
                cases.append(c)
    finally:
        if args.keep:
            print(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result = {"benchmark": "elastic_candidates", "date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
              "hosts": args.hosts, "bandwidth_mbit": args.bandwidth, "cases": cases}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
