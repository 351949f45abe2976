"""``torch.distributed`` backend: one process per worker (gloo on CPU, NCCL on GPU).

Exchanges run on a background thread over a process group of their own, so that with
a sync delay τ ≥ 1 the inner steps really compute while bytes are in flight. One thread
means exchanges run in launch order on every rank, which is what matches them across
ranks. Metrics (:meth:`all_sum_floats_async`) go over a second group of their own,
created beside it: their own TCP connections, never a payload's stream, and never the
default group that barriers and user code share. They run on a second background thread,
in call order, so the training loop can start a sum at one log step and read it at the
next.
"""

from __future__ import annotations

import functools
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist

from farsync.codecs import Codec
from farsync.comm import exchange as ex
from farsync.comm.base import Communicator, ExchangeRequest, ExchangeResult, FutureWork, Work


class Transport:
    """Point-to-point messages among the ``size`` members of one group, this process
    being member ``rank``: what :func:`run_exchange` needs of a process group.
    ``post(sends, recvs)`` starts sending ``sends[j]`` to member j and receiving
    ``recvs[j]`` from member j (None: nothing), every receive posted before any send,
    and returns the handles to wait on."""

    def __init__(self, rank: int, size: int, post):
        self.rank, self.size, self._post = rank, size, post

    # The payload phases use point-to-point messages with every receive posted before any
    # send, not gloo's all_gather / all_to_all. gloo's TCP transport sends a payload once
    # the peer has announced the matching receive, and that announcement travels on the
    # same TCP stream as the peer's own payload. Those collectives post the send first, so
    # a rank that arrives a little late writes its whole payload before its announcement
    # and the other direction waits behind it: on a rate-limited link the two directions
    # then run partly one after the other (measured with `farsync wan`: a 3.9 MB exchange
    # between 2 hosts at 20 Mbit/s took 2.5-3.2 s instead of 1.7 s). Receives first put
    # every announcement ahead of the data. Bytes sent are the same: (M-1) payloads.
    def exchange(self, sends: list[torch.Tensor | None], recvs: list[torch.Tensor | None]) -> None:
        """Send ``sends[j]`` to member j and receive ``recvs[j]`` from member j."""
        for r in self._post(sends, recvs):
            r.wait()

    def all_gather(self, mine: torch.Tensor) -> list[torch.Tensor]:
        """Every member's ``mine``, by member."""
        me, m = self.rank, self.size
        out = [mine if j == me else torch.empty_like(mine) for j in range(m)]
        self.exchange([None if j == me else mine for j in range(m)], [None if j == me else out[j] for j in range(m)])
        return out

    def from_senders(self, senders: list[int], to_send, empty) -> dict[int, torch.Tensor]:
        """Every sender's payload for this member, by sender (its own included when it
        is one): ``to_send(j)`` is what this member sends member j, ``empty(r)`` a buffer
        for what member r sends."""
        me, m = self.rank, self.size
        sending = me in senders
        recvs = [empty(j) if j in senders and j != me else None for j in range(m)]
        sends = [to_send(j) if sending and j != me else None for j in range(m)]
        self.exchange(sends, recvs)
        got = {j: t for j, t in enumerate(recvs) if t is not None}
        if sending:
            got[me] = to_send(me)
        return dict(sorted(got.items()))


def run_exchange(t: Transport, plan: ex.ExchangePlan, codec: Codec, padded: torch.Tensor, weight: float,
                 generator: torch.Generator | None, agg: ex.Aggregation,
                 buffers: ex.DecodeBuffers | None = None, round: tuple | None = None,
                 reduce_stats=None) -> ExchangeResult:
    """One weighted-mean exchange of round ``round`` among the members of ``t`` (``plan``
    made for ``t.size`` members); ranks in the result are members of ``t``. Members that
    are not all in the same exchange raise RuntimeError (:func:`~farsync.comm.exchange.
    exchange_tag`) before any payload moves.

    ``reduce_stats`` (a worker that is a site of several ranks, each exchanging one shard
    of its buffer: :mod:`farsync.comm.site`): turns this rank's per-shard statistics into
    every shard's of the whole buffer, so that the receivers' decision — who is left out —
    is one per worker, the same on every rank."""
    m = t.size
    if m == 1:
        if reduce_stats is None:
            mean, d = ex.solo(agg, padded[: plan.numel], weight)
        else:
            x = padded[: plan.numel].to(torch.float32, copy=True)
            stats = reduce_stats([ex.shard_stats({0: x}, 1)]) if agg.needs_stats and weight > 0 else None
            d = ex.decide(agg, [weight], stats)
            mean = torch.empty(0) if d.skipped else x
        return ExchangeResult(mean, (weight,), 0, 0, d.kept, d.excluded, d.skipped)
    tag = ex.exchange_tag(round, plan, codec, agg)
    hs = t.all_gather(torch.tensor([weight, tag], dtype=torch.float64, device=padded.device))
    ex.check_tags([float(x[1]) for x in hs], t.rank, round)
    weights = [float(x[0]) for x in hs]
    senders = ex.senders(weights)
    payloads = ex.encode_contribution(plan, codec, padded, generator) if weight > 0 else None

    def empty(_src: int) -> torch.Tensor:  # one payload (a whole buffer's or a shard's)
        return torch.empty(plan.payload_nbytes, dtype=torch.uint8, device=padded.device)

    if plan.method == "all-gather":
        got = t.from_senders(senders, lambda j: payloads[0], empty)
        decoded = ex.decode_all(codec, got, plan.padded_numel, buffers)
        stats = [ex.shard_stats(decoded, m)] if agg.needs_stats else None
        if stats is not None and reduce_stats is not None:
            stats = reduce_stats(stats)
        d = ex.decide(agg, weights, stats)
        mean = torch.empty(0) if d.skipped else ex.combine(agg, decoded, weights, d.kept)[: plan.numel]
    else:
        got = t.from_senders(senders, lambda j: payloads[j], empty)
        decoded = ex.decode_all(codec, got, plan.shard_numel, buffers)  # every sender's copy of shard `me`
        stats = None
        if agg.needs_stats:  # every shard owner's statistics, by shard
            stats = [s.cpu() for s in t.all_gather(ex.shard_stats(decoded, m).to(padded.device))]
            if reduce_stats is not None:
                stats = reduce_stats(stats)
        d = ex.decide(agg, weights, stats)
        if d.skipped:
            mean = torch.empty(0)
        else:
            mine = codec.encode(ex.combine(agg, decoded, weights, d.kept), generator=generator)
            mean = ex.assemble(plan, codec, t.all_gather(mine))
    return ExchangeResult(mean, tuple(weights), ex.bytes_sent(plan, weight > 0, d.skipped),
                          ex.control_bytes(plan, agg), d.kept, d.excluded, d.skipped)


class _Resources:
    """The communicator's threads and process groups, held apart from it so that they
    can be released at interpreter exit without keeping it alive.

    Why release them at all: gloo's worker threads drop each finished collective's
    handle, and with it the Python tensors it holds. A process that exits right after
    its last collective can reach the interpreter's teardown before a worker thread has
    done that; the thread then needs the GIL of a finalizing interpreter and the process
    aborts ("terminate called without an active exception"; about 1 run in 15 of
    examples/wrap_your_loop.py on a loaded 2-core box). Destroying the groups while the
    interpreter is alive joins those threads first. ``torch.distributed.
    destroy_process_group()`` alone does not: it unregisters the groups, but a group
    lives, threads and all, while anything still refers to it.
    """

    def __init__(self, *, group, control, executor: ThreadPoolExecutor, metrics: ThreadPoolExecutor):
        self.group, self.control, self.executor, self.metrics = group, control, executor, metrics

    def release(self) -> None:
        if self.executor is None:
            return
        self.metrics.shutdown(wait=True)
        self.executor.shutdown(wait=True)
        for pg in (self.group, self.control):
            if dist.is_initialized():  # else destroy_process_group() already did
                try:
                    dist.destroy_process_group(pg)
                except ValueError:  # already destroyed on its own
                    pass
        # the last references: each group's destructor joins its threads here
        self.group = self.control = self.executor = self.metrics = None


class TorchDistributedCommunicator(Communicator):
    """This process's endpoint; needs ``torch.distributed`` initialised (e.g. by torchrun).

    By default every process is one worker: the exchange runs over a process group of all
    of them, created here. A worker that is a site of several ranks passes ``groups``
    (made by :func:`farsync.comm.rendezvous.join` on every process): the exchange group of
    this rank's same-rank peers at the other sites, and the metrics group of every
    process; ``rank`` and ``world_size`` are then its place in the exchange group.

    ``delay_s`` adds a sleep before every exchange, on the background thread — a test
    hook that stands in for a slow link.
    """

    def __init__(self, *, delay_s: float = 0.0, groups: tuple | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: launch with torchrun, or call "
                "torch.distributed.init_process_group first"
            )
        if groups is None:
            # a group of its own: collectives of the exchange thread never interleave
            # with collectives the main thread issues on the default group; and one for
            # the main thread's metrics: connections no payload ever uses
            groups = (dist.new_group(backend=dist.get_backend()), dist.new_group(backend=dist.get_backend()))
        group, control = groups
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.delay_s = delay_s
        self._res = _Resources(
            group=group,
            control=control,
            executor=ThreadPoolExecutor(max_workers=1, thread_name_prefix="farsync-exchange"),
            # every metrics sum, blocking or not, runs here: one thread keeps them in
            # call order on every rank, which is what matches them across ranks
            metrics=ThreadPoolExecutor(max_workers=1, thread_name_prefix="farsync-metrics"),
        )
        self._buffers = ex.DecodeBuffers()  # used by the exchange thread only
        # released by close(), when this object is collected, or at interpreter exit,
        # whichever comes first (see _Resources)
        self._release = weakref.finalize(self, self._res.release)

    @property
    def _group(self):
        return self._res.group

    @property
    def _control(self):
        return self._res.control

    @property
    def _executor(self) -> ThreadPoolExecutor:
        return self._res.executor

    @property
    def _metrics(self) -> ThreadPoolExecutor:
        return self._res.metrics

    def exchange(self, request: ExchangeRequest) -> Work:
        ex.validate_weight(request.weight)
        plan = ex.make_plan(request.buf.numel(), self.world_size, request.codec, request.method)
        padded = ex.pad(plan, request.buf.detach())  # a private copy: the caller may reuse buf
        copied = None
        if padded.is_cuda and dist.get_backend(self._group) == "gloo":
            padded, copied = self._to_host(padded, request)
        future = self._executor.submit(self._run, plan, request, padded, copied)
        return FutureWork(future, plan.bytes_sent)

    @staticmethod
    def _to_host(padded: torch.Tensor, r: ExchangeRequest):
        """gloo moves host memory only: a buffer on the GPU is copied into pinned memory
        without waiting for it (the exchange thread waits for the returned event), and the
        exchange (codec, payloads, mean) runs on the CPU."""
        if r.codec.stochastic_rounding and r.generator is not None and r.generator.device.type != "cpu":
            raise ValueError("stochastic rounding over gloo needs its generator on the CPU (it is on "
                             f"{r.generator.device}): use NCCL, or algo.offload to form pseudo-gradients on the CPU")
        host = torch.empty(padded.shape, dtype=padded.dtype, pin_memory=True)
        host.copy_(padded, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return host, copied

    def _run(self, plan: ex.ExchangePlan, r: ExchangeRequest, padded: torch.Tensor,
             copied: "torch.cuda.Event | None" = None) -> ExchangeResult:
        if copied is not None:
            copied.synchronize()
        if self.delay_s:
            time.sleep(self.delay_s)
        generator = None if copied is not None else r.generator  # staged: round-to-nearest only (above)
        return run_exchange(self.transport, plan, r.codec, padded, float(r.weight), generator, r.aggregation,
                            self._buffers, r.round, self._reduce_stats)

    #: what :func:`run_exchange` does with a rank's shard statistics (None: nothing; a
    #: site's ranks combine theirs, :class:`farsync.comm.site.SiteCommunicator`)
    _reduce_stats = None

    @functools.cached_property
    def transport(self) -> "Transport":
        """Point-to-point messages over the exchange's own process group: what payloads
        travel on (the link probe of ``algo.auto`` uses it too, before training starts)."""
        res = self._res  # not the group itself: release() must drop the last reference to it

        def post(sends, recvs):
            g = res.group
            reqs = [dist.irecv(t, group=g, group_src=j) for j, t in enumerate(recvs) if t is not None]
            return reqs + [dist.isend(t, group=g, group_dst=j) for j, t in enumerate(sends) if t is not None]

        return Transport(self.rank, self.world_size, post)

    # Metrics cross the same link as a payload in flight, and on a FIFO link every
    # crossing waits behind the payload bytes queued there, whatever TCP connection it
    # uses (`farsync wan` at 20 Mbit/s: up to 157 KB, 63 ms; BENCHMARKS.md, WAN section).
    # gloo's all_reduce takes two dependent steps (reduce-scatter, then all-gather), each
    # sent only after the peer's receive announcement: about four crossings, 250-320 ms a
    # call there. Here every rank sends its values to every other rank with all receives
    # posted first, so the announcements cross together and the values follow: two
    # crossings, 75-165 ms. The sum is taken in rank order in float64: the same bits on
    # every rank. A blocking call cannot do better than one crossing; not waiting at all
    # needs a caller that collects the result later: the training loop starts the sum at
    # one log step and reads it at the next.
    def all_sum_floats_async(self, values: list[float]) -> Future:
        t = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()  # on the calling thread's device
        return self._metrics.submit(self._sum, t)

    def _sum(self, t: torch.Tensor) -> list[float]:
        if dist.get_backend() == "nccl":
            dist.all_reduce(t, group=self._control)
            return [float(x) for x in t.cpu()]
        g = self._control
        me, m = dist.get_rank(g), dist.get_world_size(g)  # every process, whatever the exchange group
        got = [t if j == me else torch.empty_like(t) for j in range(m)]
        reqs = [dist.irecv(got[j], group=g, group_src=j) for j in range(m) if j != me]
        reqs += [dist.isend(t, group=g, group_dst=j) for j in range(m) if j != me]
        for r in reqs:
            r.wait()
        total = got[0].clone()
        for x in got[1:]:
            total += x
        return [float(x) for x in total]

    def close(self) -> None:
        self._release()

