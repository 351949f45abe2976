"""One exchange on an emulated slow link, phase by phase, against bytes ÷ rate.

Two emulated hosts (`farsync.wan.netns`: namespaces, veth, tbf at --bandwidth Mbit/s each
way), one gloo process per host. Each process runs ``--reps`` exchanges of ``--numel``
fp32 values through :class:`TorchDistributedCommunicator` (all-gather at M = 2, what a
Streaming fragment sync does) and times its phases: the weight handshake and the payload.
A barrier on the default group lines the two ranks up before each exchange so skew does
not count. For comparison, the same bytes as per-tensor ``dist.all_reduce`` calls
(torchft's DiLoCo syncs a fragment that way) on a group of their own.

``--compute-s S`` keeps the main thread computing for S seconds after each launch (an
inner step overlapping the exchange, τ = 1). ``--metric-calls K`` then makes K calls of
``all_sum_floats`` on the main thread, ``--metrics-every`` seconds apart, while the
exchange is in flight (what the training loop does each log step) and reports how long
each call took (``--metrics-via all_reduce``: gloo's all_reduce on the default group instead, which
is what ``all_sum_floats`` did before it had a group and a protocol of its own). ``--cc`` is the
TCP congestion control in the host namespaces (``reno``, farsync wan's default;
``inherit`` keeps the machine's, ``bbr`` on the machine of BENCHMARKS.md's figures).

    sudo .venv/bin/python benchmarks/wan_exchange_probe.py --bandwidth 20 [--numel 650000] [--reps 5]

Prints one JSON object (per-rep phase times, prediction, tbf drops, TCP retransmits).
Prediction: payload bytes ÷ (rate × 1448/(1514 + 66/2)) — TCP payload share of the frames
tbf counts with both directions loaded, the factor BENCHMARKS.md's WAN section uses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

PAYLOAD_FRACTION = 1448 / (1514 + 66 / 2)


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from farsync.codecs import get_codec
    from farsync.comm.base import ExchangeRequest
    from farsync.comm.distributed import TorchDistributedCommunicator

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    comm = TorchDistributedCommunicator()
    rank = dist.get_rank()
    codec = get_codec("fp32")
    buf = torch.randn(args.numel, generator=torch.Generator().manual_seed(rank))
    marks: dict[str, float] = {}

    # timestamps of the phases, taken on the exchange thread
    orig_exchange = comm._exchange

    def timed_exchange(sends, recvs):
        marks["payload_start"] = time.perf_counter()
        orig_exchange(sends, recvs)
        marks["payload_end"] = time.perf_counter()

    comm._exchange = timed_exchange
    metric_calls: list[float] = []
    a = torch.randn(128, 128)

    reps = []
    for i in range(args.reps + 1):  # the first is a warm-up (connections, buffers)
        dist.barrier()
        metric_calls.clear()
        t0 = time.perf_counter()
        work = comm.exchange(ExchangeRequest(buf, codec, method="all-gather", round=("probe", i)))
        t_c = time.perf_counter()
        while time.perf_counter() - t_c < args.compute_s:  # an inner step overlapping the exchange
            a = torch.tanh(a @ a * 1e-2)
        for _ in range(args.metric_calls):  # the same count on both ranks: collectives pair up
            t = time.perf_counter()
            if args.metrics_via == "all_reduce":  # what all_sum_floats did before: the default group
                dist.all_reduce(torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64))
            else:
                comm.all_sum_floats([1.0, 0.0, 2.0])
            metric_calls.append(time.perf_counter() - t)
            time.sleep(args.metrics_every)
        res = work.wait()
        t1 = time.perf_counter()
        if i == 0:
            continue
        reps.append({
            "total_s": t1 - t0,
            "handshake_s": marks["payload_start"] - t0,
            "payload_s": marks["payload_end"] - marks["payload_start"],
            "after_payload_s": t1 - marks["payload_end"],
            "bytes_sent": res.bytes_sent,
            "metric_calls_s": list(metric_calls),
        })
    # torchft-like: the same bytes as per-tensor all-reduces (each ~65k floats) on their own group
    g = dist.new_group(backend="gloo")
    chunks = list(torch.split(buf.clone(), args.tensor_numel))
    ar = []
    for i in range(args.reps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        works = [dist.all_reduce(c, group=g, async_op=True) for c in chunks]
        for w in works:
            w.wait()
        if i:
            ar.append(time.perf_counter() - t0)
    comm.close()
    dist.barrier()
    out = {"rank": rank, "reps": reps, "allreduce_per_tensor_s": ar}
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


def parent(args) -> dict:
    from farsync.wan.launch import worker_env
    from farsync.wan.netns import LinkSpec, Network

    link = LinkSpec(args.bandwidth, queue_ms=args.queue_ms, burst_bytes=args.burst_bytes,
                    congestion_control=None if args.cc == "inherit" else args.cc)
    net = Network(2, link)
    with tempfile.TemporaryDirectory() as out, net:
        # per-netns TCP settings the workers will see
        cc = subprocess.run(["ip", "netns", "exec", net.host_names[0], "sysctl", "-n",
                             "net.ipv4.tcp_congestion_control"], capture_output=True, text=True).stdout.strip()
        before = net.counters()
        cmd = [sys.executable, __file__, "--worker", "--out", out, "--numel", str(args.numel), "--reps", str(args.reps),
               "--metrics-every", str(args.metrics_every), "--metric-calls", str(args.metric_calls),
               "--metrics-via", args.metrics_via, "--tensor-numel", str(args.tensor_numel),
               "--compute-s", str(args.compute_s)]
        procs = [subprocess.Popen(["ip", "netns", "exec", net.host_names[r], *cmd], env=worker_env(net, r))
                 for r in range(2)]
        backlog = []  # tbf queue of host 0's upload, sampled while the workers run

        def sample():
            while procs[0].poll() is None:
                q = json.loads(subprocess.run(["tc", "-n", net.host_names[0], "-j", "-s", "qdisc", "show", "dev", "eth0"],
                                              capture_output=True, text=True).stdout or "[]")
                backlog.append(sum(int(x.get("backlog", 0)) for x in q))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        codes = [p.wait(timeout=300) for p in procs]
        sampler.join()
        after = net.counters()
        if any(codes):
            raise SystemExit(f"worker exit codes {codes}")
        ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]
        qdisc = subprocess.run(["tc", "-n", net.host_names[0], "-s", "qdisc", "show", "dev", "eth0"],
                               capture_output=True, text=True).stdout
    nbytes = ranks[0]["reps"][0]["bytes_sent"]
    predicted = nbytes * 8 / (args.bandwidth * 1e6 * PAYLOAD_FRACTION)
    diff = [(a - b).to_dict() for a, b in zip(after, before)]

    def summ(xs):
        return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}

    res = {
        "bandwidth_mbit": args.bandwidth, "metrics_via": args.metrics_via, "burst_bytes": link.burst, "queue_ms": args.queue_ms,
        "tcp_congestion_control": cc, "numel": args.numel, "payload_bytes": nbytes,
        "predicted_s": predicted,
        "farsync": {k: summ([r[k] for rk in ranks for r in rk["reps"]])
                    for k in ("total_s", "handshake_s", "payload_s", "after_payload_s")},
        "allreduce_per_tensor_s": summ([x for rk in ranks for x in rk["allreduce_per_tensor_s"]]),
        "counters": diff, "h0_upload_backlog_bytes": summ(backlog) if backlog else None, "qdisc_h0_eth0": qdisc,
    }
    res["farsync"]["total_vs_predicted"] = res["farsync"]["total_s"]["median"] / predicted - 1
    res["allreduce_vs_predicted"] = res["allreduce_per_tensor_s"]["median"] / predicted - 1
    if args.metric_calls:
        calls = [x for rk in ranks for r in rk["reps"] for x in r["metric_calls_s"]]
        res["metric_call_s"] = {**summ(calls), "n": len(calls), "sum_per_exchange": sum(calls) / len(calls) * args.metric_calls}
        res["per_rep_metric_ms"] = [[[round(1e3 * x, 1) for x in r["metric_calls_s"]] for r in rk["reps"]] for rk in ranks]
    res["per_rep_total_s"] = [[round(r["total_s"], 4) for r in rk["reps"]] for rk in ranks]
    res["per_rep_payload_s"] = [[round(r["payload_s"], 4) for r in rk["reps"]] for rk in ranks]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bandwidth", type=float, default=20.0)
    p.add_argument("--numel", type=int, default=650_000)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--tensor-numel", type=int, default=65_536)
    p.add_argument("--metrics-every", type=float, default=0.02)
    p.add_argument("--metric-calls", type=int, default=0)
    p.add_argument("--metrics-via", choices=["all_sum_floats", "all_reduce"], default="all_sum_floats",
                   help="all_reduce: gloo's all_reduce on the default group (farsync before the control group)")
    p.add_argument("--queue-ms", type=float, default=2000.0)
    p.add_argument("--burst-bytes", type=int, default=None)
    p.add_argument("--compute-s", type=float, default=0.0)
    p.add_argument("--cc", default="reno", help="TCP congestion control in the namespaces ('inherit': the machine's)")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--out")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    res = parent(args)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
