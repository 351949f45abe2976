"""Fault injection: the home of every fault farsync can inject, for tests and benchmarks.

* A worker whose pseudo-gradients go wrong on the way out: :class:`FaultyCommunicator`
  wraps a worker's communicator and corrupts what it sends — non-finite values, or the
  buffer scaled by a large factor — without the worker knowing: its own model and
  optimizer stay clean, and nothing flags the contribution. It is what the receivers'
  checks (:class:`~farsync.comm.exchange.Aggregation`) must catch, in tests and in
  ``farsync train --train.fault=...`` (see :func:`parse_fault`). A third kind,
  ``leave:STEP``, is a worker that stops contributing from the sync sent after schedule
  step STEP on (weight 0): in one process, what an elastic run computes when that worker
  dies in the round that sync closes. The federated client corrupts its reply with the
  same :func:`corrupt`.
* A process that dies or hangs at a given step (:class:`DieAt`): a test hook, never a
  configuration key. It is set by the environment variable ``FARSYNC_DIE_AT`` =
  ``STEP``, ``STEP:SIGNAL`` or ``STEP:SIGNAL:RANK`` (SIGKILL, the default: a lost worker;
  SIGSTOP: a hung one; RANK: only the process of that torchrun rank, else every process
  that reads it): the process signals itself inside the exchange of the sync sent after
  schedule step STEP (1-based) if one is due then, else right after that step's forward
  and backward.
"""

from __future__ import annotations

import math
import os
import signal
from concurrent.futures import Future
from dataclasses import dataclass, replace

import torch

from farsync.comm.base import Communicator, ExchangeRequest, Work

FAULT_KINDS = ("nan", "scale", "leave")
#: the test hook's environment variable (see :class:`DieAt`)
DIE_AT_ENV = "FARSYNC_DIE_AT"
DIE_SIGNALS = ("SIGKILL", "SIGSTOP")


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


def corrupt(buf: torch.Tensor, kind: str, factor: float) -> torch.Tensor:
    """A corrupted copy of ``buf``: NaN at every 7th of its length (``nan``), or ×
    ``factor`` (``scale``)."""
    out = buf.detach().clone()
    if kind == "nan":
        out[:: max(1, out.numel() // 7)] = math.nan
    elif kind == "scale":
        out.mul_(factor)
    else:
        raise ValueError(f"{kind!r} does not corrupt a buffer (nan or scale:FACTOR)")
    return out


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
            request = replace(request, buf=corrupt(request.buf, self.kind, self.factor))
            self.corrupted += 1
        return self.inner.exchange(request)

    def all_sum_floats_async(self, values: list[float]) -> Future:
        return self.inner.all_sum_floats_async(values)

    def close(self) -> None:
        self.inner.close()


@dataclass(frozen=True)
class DieAt:
    """The test hook of ``FARSYNC_DIE_AT`` (see the module docstring): this process
    sends itself ``signal`` at schedule step ``step``."""

    step: int
    signal: str = "SIGKILL"

    @classmethod
    def from_env(cls) -> DieAt | None:
        """The hook ``FARSYNC_DIE_AT`` asks for this process, or None; ValueError naming a
        bad value."""
        spec = os.environ.get(DIE_AT_ENV, "")
        if not spec:
            return None
        step, _, rest = spec.partition(":")
        sig, _, rank = rest.partition(":")
        sig = sig or "SIGKILL"
        if not step.isdigit() or int(step) < 1 or sig not in DIE_SIGNALS or (rank and not rank.isdigit()):
            raise ValueError(f"{DIE_AT_ENV} must be STEP, STEP:SIGNAL or STEP:SIGNAL:RANK with STEP >= 1 and SIGNAL "
                             f"one of {', '.join(DIE_SIGNALS)} (got {spec!r})")
        if rank and rank != os.environ.get("RANK", "0"):
            return None  # another process's hook
        return cls(int(step), sig)

    def _die(self) -> None:
        os.kill(os.getpid(), getattr(signal, self.signal))

    def after_backward(self, step: int, sync_due: bool) -> None:
        """Schedule step ``step`` (1-based) computed its gradients: die now if it is the
        hook's step and no sync is due after it (else :meth:`in_sync` does, mid-sync)."""
        if step == self.step and not sync_due:
            self._die()

    def in_sync(self, round: tuple | None, weight: float) -> None:
        """Inside the exchange of ``round`` (its last entry the schedule step it was sent
        after), for a worker that contributes: die if it is the hook's step."""
        if weight > 0 and round is not None and round[-1] == self.step:
            self._die()
