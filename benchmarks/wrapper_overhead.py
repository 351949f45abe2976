"""Inner-step overhead of the DiLoCo wrapper on steps that do not sync.

Times the same training step — forward, backward, AdamW step, zero_grad — with and
without the wrapper (Streaming DiLoCo, P fragments, H larger than the measured window,
so no step syncs), alternating the two in rounds so drift in machine speed hits both
alike. Reports the median per-step time of each and the relative difference, which on
a shared 2-core machine is within run-to-run noise (a few %). So it also measures the
wrapper's own cost directly: the time inside ``algo.step()`` that is not the inner
optimizer's step (timed with optimizer step hooks), as a fraction of a plain step.

    python benchmarks/wrapper_overhead.py [--size tiny] [--steps 30] [--rounds 7]

Writes benchmarks/results/overhead.json and overhead.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from farsync.algorithms import DiLoCo  # noqa: E402
from farsync.comm import InProcessGroup  # noqa: E402
from farsync.models import Llama, model_config  # noqa: E402


def make(size: str, vocab: int, seq: int, wrapped: bool, fragments: int):
    torch.manual_seed(0)
    model = Llama(model_config(size, vocab, seq))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    algo = None
    if wrapped:
        algo = DiLoCo(model, opt, InProcessGroup(1).communicator(0), mode="streaming",
                      inner_steps=10**9, fragments=fragments, sync_delay=1, codec="fp4-e3m0")
    return model, opt, algo


class StepClock:
    """Accumulates time spent inside ``optimizer.step()`` via step hooks."""

    def __init__(self, opt):
        self.total = 0.0
        self._t0 = 0.0
        opt.register_step_pre_hook(lambda *a: setattr(self, "_t0", time.perf_counter()))
        opt.register_step_post_hook(lambda *a: setattr(self, "total", self.total + time.perf_counter() - self._t0))


def time_steps(model, opt, algo, x, y, steps: int) -> tuple[float, float]:
    """(seconds per step, seconds per step inside algo.step() but outside opt.step())."""
    wrapper = 0.0
    clock = StepClock(opt) if algo is not None else None
    t0 = time.perf_counter()
    for _ in range(steps):
        _, loss = model(x, y)
        loss.backward()
        if algo is None:
            opt.step()
        else:
            inner_before = clock.total
            t1 = time.perf_counter()
            algo.step()
            wrapper += time.perf_counter() - t1 - (clock.total - inner_before)
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps, wrapper / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--fragments", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    plain = make(args.size, args.vocab, args.seq, False, args.fragments)
    wrapped = make(args.size, args.vocab, args.seq, True, args.fragments)
    for m in (plain, wrapped):  # warm up allocator and kernels
        time_steps(*m, x, y, 5)
    t_plain, t_wrapped, t_book = [], [], []
    for r in range(args.rounds):
        order = [(plain, t_plain), (wrapped, t_wrapped)]
        for m, acc in (order if r % 2 == 0 else order[::-1]):
            per_step, book = time_steps(*m, x, y, args.steps)
            acc.append(per_step)
            if m is wrapped:
                t_book.append(book)
    assert wrapped[2].stats.sync_events == 0  # no step synced: only the wrapper's bookkeeping
    mp, mw = statistics.median(t_plain), statistics.median(t_wrapped)
    result = {
        "benchmark": "wrapper_overhead",
        "date": datetime.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "config": vars(args),
        "seconds_per_step_plain": t_plain,
        "seconds_per_step_wrapped": t_wrapped,
        "median_plain_s": mp,
        "median_wrapped_s": mw,
        "overhead_fraction": (mw - mp) / mp,
        "wrapper_seconds_per_step": t_book,
        "median_wrapper_s": statistics.median(t_book),
        "wrapper_fraction": statistics.median(t_book) / mp,
        "target_fraction": 0.01,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "overhead.json"), "w") as f:
        json.dump(result, f, indent=2)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([1e3 * t for t in t_plain], "o-", label=f"plain loop (median {1e3 * mp:.1f} ms)")
    ax.plot([1e3 * t for t in t_wrapped], "s-", label=f"with DiLoCo wrapper (median {1e3 * mw:.1f} ms)")
    ax.set_xlabel("round")
    ax.set_ylabel("ms per step")
    ax.set_title(f"non-syncing steps: end to end {100 * result['overhead_fraction']:+.2f} %, "
                 f"wrapper's own time {100 * result['wrapper_fraction']:.3f} %", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "overhead.png"), dpi=120)
    print(json.dumps({k: result[k] for k in ("median_plain_s", "median_wrapped_s", "overhead_fraction",
                                            "median_wrapper_s", "wrapper_fraction")}, indent=2))


if __name__ == "__main__":
    main()
