"""What the torch.distributed communicator posts, and on which group (no network).

The timing these orders buy is measured in BENCHMARKS.md (WAN section); what is pinned
here can fail without any clock: metrics travel on a group of their own, distinct from
the payload's; every receive of a phase is posted before any of its sends.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from farsync.codecs import get_codec
from farsync.comm import distributed as dmod
from farsync.comm import exchange as ex
from farsync.comm.base import ExchangeRequest
from farsync.comm.distributed import TorchDistributedCommunicator

PAYLOAD, CONTROL = "payload-group", "control-group"


class _Done:
    def wait(self):
        return True


class FakeDist:
    """Records irecv / isend / all_gather / all_reduce; a receive from rank j fills the
    tensor with j + 1 (weights: 1.0)."""

    def __init__(self, rank=0, world=1):
        self.calls: list[tuple[str, int | None, str]] = []
        self.rank, self.world = rank, world

    def get_rank(self, group=None):
        return self.rank

    def get_world_size(self, group=None):
        return self.world

    def get_backend(self, group=None):
        return "gloo"

    tag = None  # the exchange's tag the peers send in the handshake (else: their rank + 1, as everything)

    def irecv(self, t, group=None, group_src=None):
        src = group_src
        t.fill_(src + 1)
        if self.tag is not None and t.dtype == torch.float64 and t.shape == (2,):  # the handshake: weight, tag
            t[1] = self.tag
        self.calls.append(("recv", src, group))
        return _Done()

    def isend(self, t, group=None, group_dst=None):
        self.calls.append(("send", group_dst, group))
        return _Done()

    def all_gather(self, out, t, group):
        for o in out:
            o.fill_(1.0)
        self.calls.append(("all_gather", None, group))

    def all_reduce(self, t, group=None):
        self.calls.append(("all_reduce", None, group))


def fake_comm(monkeypatch, rank, world):
    fake = FakeDist(rank, world)
    monkeypatch.setattr(dmod, "dist", fake)
    comm = object.__new__(TorchDistributedCommunicator)
    comm.rank, comm.world_size, comm.delay_s = rank, world, 0.0
    comm._buffers = ex.DecodeBuffers()
    comm._res = dmod._Resources(group=PAYLOAD, control=CONTROL, executor=ThreadPoolExecutor(max_workers=1),
                                metrics=ThreadPoolExecutor(max_workers=1))
    return comm, fake


@pytest.mark.parametrize("rank,world", [(0, 2), (1, 3), (2, 4)])
def test_metrics_use_the_control_group_receives_first_and_sum_in_rank_order(monkeypatch, rank, world):
    comm, fake = fake_comm(monkeypatch, rank, world)
    mine = [0.1, 1.0, 7.0]
    got = comm.all_sum_floats(mine)
    others = [j for j in range(world) if j != rank]
    assert fake.calls == [("recv", j, CONTROL) for j in others] + [("send", j, CONTROL) for j in others]
    expect = torch.tensor(mine, dtype=torch.float64) * 0
    for j in range(world):  # rank order, float64
        expect += torch.tensor(mine, dtype=torch.float64) if j == rank else torch.full((3,), j + 1.0, dtype=torch.float64)
    assert got == expect.tolist()


class _Gated:
    def __init__(self, gate: threading.Event):
        self.gate = gate

    def wait(self):
        assert self.gate.wait(30)
        return True


def test_an_async_sum_returns_at_once_and_sums_run_in_call_order(monkeypatch):
    comm, fake = fake_comm(monkeypatch, 0, 2)
    gate = threading.Event()  # every receive completes once the gate opens
    recv = fake.irecv
    monkeypatch.setattr(fake, "irecv", lambda t, group=None, group_src=None: (recv(t, group, group_src), _Gated(gate))[1])
    first = comm.all_sum_floats_async([1.0])
    second = comm.all_sum_floats_async([2.0])
    assert not first.done() and not second.done()
    gate.set()
    assert first.result(timeout=30) == [3.0] and second.result(timeout=30) == [4.0]  # + rank 1's 2.0
    assert fake.calls == [("recv", 1, CONTROL), ("send", 1, CONTROL)] * 2  # one sum after the other
    comm._metrics.shutdown()


@pytest.mark.parametrize("checked", [False, True])
@pytest.mark.parametrize("method,world", [("all-gather", 2), ("reduce-scatter", 3)])
def test_payload_phases_stay_on_the_payload_group_handshake_first_receives_first(monkeypatch, method, world, checked):
    comm, fake = fake_comm(monkeypatch, 1, world)
    codec = get_codec("fp32")
    plan = ex.make_plan(96, world, codec, method)
    agg = ex.Aggregation(outlier_factor=None) if checked else ex.PLAIN  # the fake payloads differ wildly in norm
    fake.tag = ex.exchange_tag(("fragment", 0, 4), plan, codec, agg)
    res = comm._run(plan, ExchangeRequest(torch.ones(96), codec, 1.0, None, method, round=("fragment", 0, 4),
                                          aggregation=agg), ex.pad(plan, torch.ones(96)))
    assert res.kept == tuple(range(world)) and not res.excluded
    others = [j for j in range(world) if j != 1]
    phase = [("recv", j, PAYLOAD) for j in others] + [("send", j, PAYLOAD) for j in others]
    # the weights, then: all-to-all of shards, (checked: the shard owners' statistics),
    # all-gather of reduced shards
    phases = 1 if method == "all-gather" else 3 if checked else 2
    assert fake.calls == phase + phase * phases
    assert res.control_bytes == ex.control_bytes(plan, agg)


def test_control_group_is_neither_the_payload_group_nor_the_default_group(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=30))
    try:
        comm = TorchDistributedCommunicator()
        try:
            assert comm._control is not comm._group
            assert dist.group.WORLD not in (comm._control, comm._group)
            assert comm.all_sum_floats([1.5, 2.0]) == [1.5, 2.0]
            assert comm.all_sum_floats_async([0.5]).result(timeout=30) == [0.5]
        finally:
            comm.close()
    finally:
        dist.destroy_process_group()

