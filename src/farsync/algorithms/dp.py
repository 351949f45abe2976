"""Data-parallel training: the gradient mean every step — the baseline every quality and
bandwidth figure is compared against, through the same phases as DiLoCo."""

from __future__ import annotations

import torch

from farsync.algorithms.fragments import flatten, local, unflatten_into
from farsync.algorithms.strategy import Strategy
from farsync.codecs import get_codec
from farsync.comm.base import Work
from farsync.schedule import DP_CODEC


class DataParallel(Strategy):
    """One worker's side of data-parallel training: every step, the gradients are
    averaged over the M workers (in fp32, :data:`farsync.schedule.DP_CODEC`) before the
    inner optimizer's step. Arguments as :class:`~farsync.algorithms.strategy.Strategy`.
    """

    mode = "dp"
    #: fp32 is lossless and stateless: one codec serves every instance
    codec = get_codec(DP_CODEC)
    _work: Work | None = None  # the gradient mean in flight
    _synced = False  # this step's gradients are averaged already

    def launch(self) -> None:
        """Start the mean of this worker's gradients."""
        if self._work is not None or self._synced:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(local(p)) for p in self.params]
        self._work = self._start(flatten(grads), self.codec, round=("gradient", self.step_count + 1))

    def wait(self) -> None:
        """Wait for the gradient mean and write it into ``p.grad``."""
        if self._work is None:
            return
        res = self._wait(self._work)
        self._work = None
        if res.invalid_ranks:
            raise FloatingPointError(
                f"non-finite gradient on worker(s) {res.invalid_ranks} at step {self.step_count + 1}; stopping"
            )
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        unflatten_into(res.mean, [p.grad for p in self.params])
        self.stats.record_event(res.bytes_sent, res.control_bytes, res.site_bytes)
        self._synced = True

    def inner_step(self, tokens: int | None = None) -> None:
        """The inner optimizer's step on the averaged gradients."""
        if not self._synced:
            self.sync_gradients()
        self.inner_optimizer.step()
        self._synced = False
        self.step_count += 1
        self.stats.inner_steps = self.step_count
        self.stats.tokens += 1 if tokens is None else int(tokens)

    @property
    def in_flight(self) -> list[int]:
        return [0] if self._work is not None else []
