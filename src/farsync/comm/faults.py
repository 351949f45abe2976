"""Fault injection: a worker whose pseudo-gradients go wrong on the way out.

:class:`FaultyCommunicator` wraps a worker's communicator and corrupts what it sends —
non-finite values, or the buffer scaled by a large factor — without the worker knowing:
its own model and optimizer stay clean, and nothing flags the contribution. It is what
the receivers' checks (:class:`~farsync.comm.exchange.Aggregation`) must catch, in tests
and in ``farsync train --train.fault=...`` (see :func:`parse_fault`). A third kind,
``leave:STEP``, is a worker that stops contributing from the sync sent after schedule
step STEP on (weight 0): in one process, what an elastic run computes when that worker
dies in the round that sync closes.
"""

from __future__ import annotations

import math
from concurrent.futures import Future
from dataclasses import replace

from farsync.comm.base import Communicator, ExchangeRequest, Work

FAULT_KINDS = ("nan", "scale", "leave")


def parse_fault(spec: str) -> tuple[str, float]:
    """``"nan"``, ``"scale:FACTOR"`` or ``"leave:STEP"`` → (kind, factor or step);
    ValueError naming the problem."""
    kind, _, arg = spec.partition(":")
    if kind not in FAULT_KINDS:
        raise ValueError(f"fault must be nan, scale:FACTOR or leave:STEP (got {spec!r})")
    if kind == "nan":
        return kind, math.nan
    try:
        factor = float(arg)
    except ValueError:
        raise ValueError(f"fault {kind}:{'STEP' if kind == 'leave' else 'FACTOR'} needs a number (got {spec!r})") from None
    return kind, factor


class FaultyCommunicator(Communicator):
    """``inner`` with every outgoing buffer of a round in ``rounds`` corrupted (all
    rounds when None; a round is the :class:`ExchangeRequest`'s ``round`` tag)."""

    def __init__(self, inner: Communicator, kind: str = "nan", factor: float = 1000.0, rounds=None):
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {', '.join(FAULT_KINDS)} (got {kind!r})")
        self.inner, self.kind, self.factor, self.rounds = inner, kind, factor, rounds
        self.rank, self.world_size = inner.rank, inner.world_size
        self.corrupted = 0  # buffers corrupted so far

    def exchange(self, request: ExchangeRequest) -> Work:
        if self.kind == "leave":  # factor: the first schedule step whose sync goes without it
            if request.round is not None and request.round[-1] >= self.factor:
                request = replace(request, weight=0.0)
                self.corrupted += 1
            return self.inner.exchange(request)
        if self.rounds is None or request.round in self.rounds:
            buf = request.buf.detach().clone()
            if self.kind == "nan":
                buf[:: max(1, buf.numel() // 7)] = math.nan
            else:
                buf.mul_(self.factor)
            request = replace(request, buf=buf)
            self.corrupted += 1
        return self.inner.exchange(request)

    def all_reduce_mean(self, buf, codec, **kw) -> Work:
        return self.exchange(ExchangeRequest(buf, codec, **kw))

    def all_sum_floats_async(self, values: list[float]) -> Future:
        return self.inner.all_sum_floats_async(values)

    def close(self) -> None:
        self.inner.close()
