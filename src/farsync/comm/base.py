"""The communication seam: every collective farsync's algorithms use goes through here.

One call matters: :meth:`Communicator.all_reduce_mean` — an *asynchronous* mean of a flat
fp32 buffer across all workers, sent under a codec, returning a :class:`Work` handle to
wait on. Two backends implement it: :mod:`farsync.comm.inprocess` (M simulated workers in
one process, deterministic) and :mod:`farsync.comm.distributed` (``torch.distributed``,
one process per worker). Both run the *same* exchange arithmetic from
:mod:`farsync.comm.exchange`, so they produce bit-identical results for the same inputs.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from farsync.codecs import Codec


@dataclass(frozen=True)
class ExchangeResult:
    """What one finished exchange gives back to every worker."""

    mean: torch.Tensor  # (numel,) fp32: Σ_m w_m x_m / Σ_m w_m, identical on every worker
    weights: tuple[float, ...]  # every worker's weight, by rank; NaN marks an invalid contribution
    bytes_sent: int  # payload bytes this worker sent (control bytes excluded)
    control_bytes: int  # bytes this worker sent for the weights / validity exchange

    @property
    def invalid_ranks(self) -> list[int]:
        return [r for r, w in enumerate(self.weights) if w != w]  # NaN != NaN


class Work(abc.ABC):
    """Handle of an exchange in flight."""

    #: payload bytes this worker sends for the exchange (known at launch)
    bytes_sent: int

    @abc.abstractmethod
    def wait(self) -> ExchangeResult:
        """Block until the exchange is done; return its result (idempotent)."""

    @abc.abstractmethod
    def is_completed(self) -> bool:
        """True when :meth:`wait` would not block."""


class CompletedWork(Work):
    """A Work whose result is already known (M = 1, or restored from a checkpoint)."""

    def __init__(self, result: ExchangeResult):
        self._result = result
        self.bytes_sent = result.bytes_sent

    def wait(self) -> ExchangeResult:
        return self._result

    def is_completed(self) -> bool:
        return True


class Communicator(abc.ABC):
    """One worker's endpoint of the exchange group."""

    rank: int
    world_size: int

    @abc.abstractmethod
    def all_reduce_mean(
        self,
        buf: torch.Tensor,
        codec: Codec,
        *,
        weight: float = 1.0,
        generator: torch.Generator | None = None,
        method: str = "auto",
    ) -> Work:
        """Start the weighted mean of ``buf`` (1-D fp32) over all workers.

        ``weight`` is this worker's weight w_m (NaN marks the contribution invalid: the
        data exchange is then skipped on every worker and ``invalid_ranks`` names the
        culprits). ``method`` is ``"reduce-scatter"``, ``"all-gather"`` or ``"auto"``;
        see :mod:`farsync.comm.exchange`. ``buf`` may be reused by the caller as soon as
        this returns.
        """

    def all_sum_floats(self, values: list[float]) -> list[float]:
        """Blocking sum of a few floats over workers (metrics only; not counted)."""
        return list(values)

    def close(self) -> None:
        """Release background resources."""
