"""One worker process of the gloo tests: joins a process group through a TCPStore the
test opened on port 0, runs the toy model under each requested configuration and saves
its parameters and accounting for the parent to compare."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from farsync.algorithms import make_strategy  # noqa: E402
from farsync.comm import TorchDistributedCommunicator  # noqa: E402
from farsync.comm.faults import FaultyCommunicator, parse_fault  # noqa: E402
from toy import batch, loss_fn, make_model  # noqa: E402

THREADS = 1  # the in-process side of the test uses the same count: float sums depend on it


def os_threads_left(before: int, wait_s: float = 5.0) -> int:
    """OS threads above ``before``, once those already joined have gone.

    A joined thread can still be listed for a moment: Python's ``Thread.join`` returns
    when the thread drops its state, and ``pthread_join`` when the kernel clears its id,
    both before the kernel removes the task from ``/proc/self/task`` (seen once on a
    loaded CI box). A thread nobody joined stays listed, and the count says so after
    ``wait_s``.
    """
    deadline = time.monotonic() + wait_s
    while True:
        left = len(os.listdir("/proc/self/task")) - before
        if left <= 0 or time.monotonic() > deadline:
            return left
        time.sleep(0.01)


def tokens_of(rank: int, unequal: bool) -> int | None:
    """Tokens a worker reports per step: None (each step counts 1), or 100·(rank + 1)."""
    return 100 * (rank + 1) if unequal else None


def train(comm, rank, steps, compute_s=0.0, metrics=False, unequal_tokens=False, **kw):
    """The toy model; with ``metrics``, a metrics sum started every step and read at the end."""
    model = make_model(0)
    algo = make_strategy(model, torch.optim.AdamW(model.parameters(), lr=1e-2), comm, **kw)
    sums = []
    for s in range(steps):
        x, y = batch(rank, s)
        loss_fn(model, x, y).backward()
        if compute_s:
            time.sleep(compute_s)  # stands in for a heavier forward/backward
        algo.step(tokens_of(rank, unequal_tokens))
        algo.inner_optimizer.zero_grad()
        if metrics:
            sums.append(comm.all_sum_floats_async([float(rank + 1) * (s + 1), 0.1 * rank]))
    before_finish = algo.stats.to_dict()  # finish() adds its own, waited-for syncs
    algo.finish()
    return model, algo, [f.result() for f in sums], before_finish


def mismatch(args) -> None:
    from farsync.codecs import get_codec
    from farsync.comm.base import ExchangeRequest

    comm = TorchDistributedCommunicator()
    req = ExchangeRequest(torch.ones(64), get_codec("fp32"), round=("fragment", args.rank, 10))
    try:
        comm.exchange(req).wait()
        why = None
    except RuntimeError as e:
        why = str(e)
    comm.close()
    with open(os.path.join(args.out, f"stats-{args.rank}.json"), "w") as f:
        json.dump({"error": why}, f)
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--task", choices=["equal", "overlap", "mismatch"], required=True)
    ap.add_argument("--configs", required=True, help="JSON list of make_strategy keyword dicts")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    store = dist.TCPStore("127.0.0.1", args.port, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=args.rank, world_size=args.world,
                            timeout=timedelta(seconds=60))
    if args.task == "mismatch":  # every rank in a round of its own: refused before any payload moves
        mismatch(args)
        return
    results = []
    for i, cfg in enumerate(json.loads(args.configs)):
        delay = cfg.pop("delay_s", 0.0)
        compute_s = cfg.pop("compute_s", 0.0)
        metrics = cfg.pop("metrics", False)
        fault = cfg.pop("fault", None)
        threads = len(os.listdir("/proc/self/task"))  # OS threads, gloo's included
        comm = TorchDistributedCommunicator(delay_s=delay)
        if fault and args.rank == 1:
            comm = FaultyCommunicator(comm, *parse_fault(fault))
        model, algo, sums, before_finish = train(comm, args.rank, args.steps, compute_s=compute_s,
                                                 metrics=metrics, **cfg)
        comm.close()
        threads_left = os_threads_left(threads)
        torch.save([p.detach() for p in model.parameters()], os.path.join(args.out, f"params-{i}-{args.rank}.pt"))
        results.append({**algo.stats.to_dict(), "metric_sums": sums, "before_finish": before_finish,
                        "threads_left": threads_left, "exclusions": getattr(algo, "exclusions", [])})
    with open(os.path.join(args.out, f"stats-{args.rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
