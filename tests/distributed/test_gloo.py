"""Real gloo processes (port 0, timeouts) against the in-process backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from farsync.algorithms import finish_in_lockstep, make_strategy, step_in_lockstep
from farsync.codecs import CODEC_NAMES
from farsync.comm import InProcessGroup
from farsync.comm.faults import FaultyCommunicator, parse_fault
from gloo_worker import tokens_of
from toy import batch, loss_fn, make_model

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

WORKER = os.path.join(os.path.dirname(__file__), "gloo_worker.py")


def launch(world, task, configs, out, steps=10):
    """Run `world` worker processes; the store listens on a free port chosen by the OS."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, "--rank", str(r), "--world", str(world), "--port", str(store.port),
             "--out", str(out), "--task", task, "--configs", json.dumps(configs), "--steps", str(steps)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(world)
    ]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for r, (p, o) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} failed:\n{o}"
    del store
    return [json.load(open(out / f"stats-{r}.json")) for r in range(world)]


def in_process(world, steps, **kw):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker processes (gloo_worker.THREADS): float sums depend on it
    try:
        return _in_process(world, steps, **kw)
    finally:
        torch.set_num_threads(threads)


def _in_process(world, steps, unequal_tokens=False, fault=None, **kw):
    group = InProcessGroup(world)
    comms = group.communicators()
    if fault:
        comms[1] = FaultyCommunicator(comms[1], *parse_fault(fault))
    models = [make_model(0) for _ in range(world)]
    algos = [make_strategy(m, torch.optim.AdamW(m.parameters(), lr=1e-2), comms[r], **kw)
             for r, m in enumerate(models)]
    tokens = [tokens_of(r, unequal_tokens) for r in range(world)] if unequal_tokens else None
    for s in range(steps):
        for r, m in enumerate(models):
            x, y = batch(r, s)
            loss_fn(m, x, y).backward()
        step_in_lockstep(algos, tokens=tokens)
        for a in algos:
            a.inner_optimizer.zero_grad()
    finish_in_lockstep(algos)  # one worker's finish waits on exchanges the others launch
    return models, algos


@pytest.mark.parametrize("world", [2, 4])
def test_gloo_processes_match_in_process_for_every_codec(world, tmp_path):
    configs = [
        dict(mode="streaming", inner_steps=4, fragments=2, sync_delay=1, codec=c,
             stochastic_rounding=c.startswith("fp4"), seed=3)
        for c in CODEC_NAMES
    ] + [dict(mode="dp")] + [
        # unequal tokens (weights 100, 200, ...), K of M sampled per round, worker 1 sending
        # garbage every round: the same picks, exclusions and bits in both backends
        dict(mode="streaming", inner_steps=4, fragments=2, sync_delay=1, codec="fp4-e3m0", unequal_tokens=True,
             participation=max(1, world - 1), participation_seed=5, fault="scale:1000"),
        dict(mode="diloco", inner_steps=3, codec="int8", unequal_tokens=True, fault="nan"),
        # a sparse codec (all-gather) with SparseLoCo's error feedback, unequal tokens, a faulty worker
        dict(mode="streaming", inner_steps=4, fragments=2, sync_delay=1, codec="topk16-int2", codec_block_size=256,
             error_feedback=True, error_feedback_decay=0.9, outer_momentum=0.0, unequal_tokens=True,
             fault="scale:1000"),
    ]
    stats = launch(world, "equal", [dict(c) for c in configs], tmp_path)
    for i, cfg in enumerate(configs):
        models, algos = in_process(world, 10, **cfg)
        for r in range(world):
            got = torch.load(tmp_path / f"params-{i}-{r}.pt")
            for a, b in zip(got, models[r].parameters()):
                assert torch.equal(a, b.detach()), f"{cfg} rank {r}: gloo and in-process differ"
            assert stats[r][i]["bytes_sent"] == algos[r].stats.bytes_sent
            assert stats[r][i]["sync_events"] == algos[r].stats.sync_events
            for key in ("rounds_joined", "rounds_sat_out", "rounds_excluded", "tokens", "control_bytes"):
                assert stats[r][i][key] == getattr(algos[r].stats, key), f"{cfg} rank {r}: {key}"
            assert stats[r][i]["exclusions"] == getattr(algos[r], "exclusions", [])
            if cfg.get("fault"):
                assert stats[r][i]["exclusions"], f"{cfg}: the faulty worker was never left out"
            # close() joined the communicator's threads and its groups' gloo threads: none
            # is left to run at interpreter exit (where gloo aborts the process)
            assert stats[r][i]["threads_left"] == 0, f"{cfg} rank {r}: {stats[r][i]['threads_left']} threads left"


def test_gloo_overlap_hides_slow_exchange(tmp_path):
    """A 0.3 s exchange behind 0.4 s steps: τ = 1 hides it, τ = 0 waits it out."""
    base = dict(mode="streaming", inner_steps=4, fragments=2, mixing=0.5, delay_s=0.3, compute_s=0.4)
    stats = launch(2, "overlap", [dict(base, sync_delay=1), dict(base, sync_delay=0)], tmp_path, steps=9)
    for r in range(2):
        overlap, serial = (s["before_finish"] for s in stats[r])  # the training steps, not finish()'s syncs
        assert overlap["sync_events"] == serial["sync_events"] == 3  # sent after steps 4, 6, 8
        assert serial["blocked_seconds"] >= 0.8 * 3 * 0.3
        assert overlap["blocked_seconds"] < 0.25 * serial["blocked_seconds"]


def test_gloo_metric_sums_started_during_exchanges_land_equal_on_every_rank(tmp_path):
    """Sums started every step while exchanges are in flight, read at the end: each is
    the rank-order sum, the same on both ranks, and the exchanges still match."""
    cfg = dict(mode="streaming", inner_steps=4, fragments=2, sync_delay=1, delay_s=0.05, metrics=True)
    stats = launch(2, "equal", [dict(cfg)], tmp_path, steps=8)
    expect = [[1.0 * (s + 1) + 2.0 * (s + 1), 0.0 + 0.1] for s in range(8)]
    assert stats[0][0]["metric_sums"] == stats[1][0]["metric_sums"] == expect
    assert stats[0][0]["sync_events"] == stats[1][0]["sync_events"] > 0


def test_gloo_workers_in_different_rounds_are_refused(tmp_path):
    """The round check holds across processes: two ranks that send different rounds to
    one exchange both stop with an error naming the other, instead of mixing payloads."""
    got = launch(2, "mismatch", [], tmp_path)
    assert "mismatched exchange: member(s) [1]" in got[0]["error"]
    assert "mismatched exchange: member(s) [0]" in got[1]["error"]
    assert "round ('fragment', 0, 10)" in got[0]["error"] and "round ('fragment', 1, 10)" in got[1]["error"]
