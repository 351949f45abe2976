"""A worker that is a site: R ranks (GPUs) that train as one replica, exchanging between
sites shard by shard.

Rank r of every worker owns shard r of each buffer the strategy exchanges (a fragment's
pseudo-gradient, or data-parallel's gradient) and exchanges it with rank r of the other
workers over its own cross-site group: R streams cross the link side by side, each 1/R of
the bytes (torchft's HSDP shape). Two inner parallelisms:

* **DDP** (``sharded=False``): every rank holds the whole buffer. It sends its shard; the
  mean shards are gathered back inside the site (the fast link; counted as ``site_bytes``,
  apart from the cross-site bytes), so every rank lands the same whole mean.
* **FSDP** (``sharded=True``): each rank holds only its shard of the parameters (FSDP2's
  ``fully_shard``), so its buffer *is* its shard; nothing is gathered.

Shards are cut at multiples of the codec's block size, so every payload holds the blocks
a one-rank worker's payload holds: the same bytes, in R pieces. Whatever the receivers
decide about a worker — left out as non-finite or an outlier — is decided once for the
whole worker: the ranks of each site combine their shards' sums of squares and
finiteness (an all-gather inside the site, on the exchange thread's own site group)
before anyone decides, so every rank of every site reaches the same decision.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

from farsync.comm import exchange as ex
from farsync.comm.base import ExchangeRequest, ExchangeResult, FutureWork, Work
from farsync.comm.distributed import TorchDistributedCommunicator


@dataclasses.dataclass(frozen=True)
class Site:
    """This rank's place in its site: ``rank`` of ``size`` ranks, and the process group
    the exchange thread uses inside the site (never the one the model's gradients use)."""

    rank: int
    size: int
    group: object


def shard_numel(numel: int, ranks: int, alignment: int) -> int:
    """Values per rank's shard of a buffer of ``numel``: a whole number of codec blocks,
    the R shards together at least ``numel``."""
    return max(alignment, math.ceil(numel / ranks / alignment) * alignment)


class SiteCommunicator(TorchDistributedCommunicator):
    """Rank ``site.rank`` of a worker of ``site.size`` ranks (see the module docstring):
    ``groups`` = (its cross-site group, the metrics group of every process); ``rank`` and
    ``world_size`` are the worker's index and the number of workers."""

    def __init__(self, *, groups: tuple, site: Site, sharded: bool, delay_s: float = 0.0):
        super().__init__(groups=groups, delay_s=delay_s)
        self.site, self.sharded = site, sharded

    def exchange(self, request: ExchangeRequest) -> Work:
        if self.sharded:  # FSDP: the buffer is this rank's shard already
            return super().exchange(request)
        ex.validate_weight(request.weight)
        full = request.buf.detach().reshape(-1)
        n, R, r = full.numel(), self.site.size, self.site.rank
        per = shard_numel(n, R, request.codec.alignment)
        padded_full = torch.zeros(per * R, dtype=torch.float32, device=full.device)
        padded_full[:n].copy_(full)
        shard = padded_full[r * per:(r + 1) * per]
        plan = ex.make_plan(per, self.world_size, request.codec, request.method)
        req = dataclasses.replace(request, buf=shard)
        future = self._executor.submit(self._run_gathered, plan, req, ex.pad(plan, shard), n)
        return FutureWork(future, plan.bytes_sent)

    def _run_gathered(self, plan: ex.ExchangePlan, r: ExchangeRequest, padded: torch.Tensor, numel: int) -> ExchangeResult:
        """The shard's exchange, then the mean shards gathered inside the site (DDP)."""
        res = self._run(plan, r, padded)
        if res.skipped:  # decided alike on every rank: nobody gathers
            return res
        R, g = self.site.size, self.site.group
        parts = [torch.empty_like(res.mean) for _ in range(R)]
        dist.all_gather(parts, res.mean.contiguous(), group=g)
        site_bytes = (R - 1) * res.mean.numel() * res.mean.element_size()
        return dataclasses.replace(res, mean=torch.cat(parts)[:numel], site_bytes=site_bytes)

    def _reduce_stats(self, stats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every shard's statistics of the whole worker: this rank's (one (M, 2) tensor per
        shard of its exchange), and its site peers', in site-rank order."""
        mine = torch.stack(stats)
        got = [torch.empty_like(mine) for _ in range(self.site.size)]
        dist.all_gather(got, mine, group=self.site.group)
        return [s for g in got for s in g]
