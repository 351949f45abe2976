"""The communication seam: every collective farsync's algorithms use goes through here.

One door: :meth:`Communicator.exchange` — an *asynchronous* weighted mean of a flat fp32
buffer across the workers, sent under a codec, returning a :class:`Work` handle to wait
on. What to exchange is an :class:`ExchangeRequest`: the buffer and codec, this worker's
weight w_m (1, or e.g. the tokens it processed) and the round it belongs to. Three
backends implement it: :mod:`farsync.comm.inprocess` (M simulated workers in one
process, deterministic), :mod:`farsync.comm.distributed` (``torch.distributed``, one
process per worker) and :mod:`farsync.comm.elastic` (torchft). All run the *same*
exchange arithmetic from :mod:`farsync.comm.exchange`, so they produce bit-identical
results for the same inputs, and all refuse an exchange whose workers disagree on its
round, size, codec, method or aggregation.
"""

from __future__ import annotations

import abc
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from farsync.codecs import Codec
from farsync.comm.exchange import PLAIN, Aggregation


@dataclass(frozen=True)
class ExchangeResult:
    """What one finished exchange gives back to every worker."""

    mean: torch.Tensor  # (numel,) fp32: the kept contributions combined; empty if skipped
    weights: tuple[float, ...]  # every worker's weight, by rank; NaN marks a flagged contribution
    bytes_sent: int  # payload bytes this worker sent (control bytes excluded)
    control_bytes: int  # bytes this worker sent for the weights / validity exchange
    kept: tuple[int, ...] | None = None  # ranks in the result (None: every rank)
    excluded: tuple[tuple[int, str], ...] = ()  # (rank, why) of contributions left out
    skipped: bool = False  # too few contributions kept: no result, θ_g stays
    site_bytes: int = 0  # bytes this rank sent inside its site to gather the mean (a site of several ranks)

    @property
    def invalid_ranks(self) -> list[int]:
        return [r for r, w in enumerate(self.weights) if w != w]  # NaN != NaN


@dataclass(frozen=True)
class ExchangeRequest:
    """One worker's contribution to one exchange.

    ``weight`` is w_m in Σ w_m x_m / Σ w_m: 0 keeps this worker out of the round (it
    still receives the result), NaN flags its contribution as invalid. ``aggregation``
    says how receivers check and combine contributions (:class:`~farsync.comm.exchange.
    Aggregation`); every worker must pass the same.
    ``round`` identifies the sync this exchange belongs to (e.g. ``("fragment", 1, 40)``);
    a backend that sees two workers contribute different rounds to one exchange raises.
    """

    buf: torch.Tensor  # 1-D fp32; the caller may reuse it as soon as the exchange starts
    codec: Codec
    weight: float = 1.0
    generator: torch.Generator | None = None  # stochastic rounding
    method: str = "auto"  # farsync.schedule.EXCHANGES
    round: tuple | None = None
    aggregation: Aggregation = PLAIN


class Work(abc.ABC):
    """Handle of an exchange in flight."""

    #: payload bytes this worker sends for the exchange (known at launch)
    bytes_sent: int

    @abc.abstractmethod
    def wait(self) -> ExchangeResult:
        """Block until the exchange is done; return its result (idempotent)."""


class CompletedWork(Work):
    """A Work whose result is already known (M = 1, or restored from a checkpoint)."""

    def __init__(self, result: ExchangeResult):
        self._result = result
        self.bytes_sent = result.bytes_sent

    def wait(self) -> ExchangeResult:
        return self._result


class FutureWork(Work):
    """A Work whose result a background thread computes (its exception, if any, is
    raised by :meth:`wait`)."""

    def __init__(self, future: Future, bytes_sent: int):
        self._future = future
        self.bytes_sent = bytes_sent

    def wait(self) -> ExchangeResult:
        return self._future.result()


def completed_future(value) -> Future:
    """A Future that already holds ``value``."""
    f: Future = Future()
    f.set_result(value)
    return f


class Communicator(abc.ABC):
    """One worker's endpoint of the exchange group."""

    rank: int
    world_size: int

    @abc.abstractmethod
    def exchange(self, request: ExchangeRequest) -> Work:
        """Start the exchange ``request`` describes; return the handle to wait on.
        ``request.buf`` may be reused by the caller as soon as this returns."""

    def all_sum_floats_async(self, values: list[float]) -> Future:
        """Start the sum of a few floats over workers (metrics only; not counted); a
        Future of the sums. Here there is nothing to cross: it is already done."""
        return completed_future(list(values))

    def all_sum_floats(self, values: list[float]) -> list[float]:
        """Blocking sum of a few floats over workers (metrics only; not counted)."""
        return self.all_sum_floats_async(values).result()

    def close(self) -> None:
        """Release background resources."""
