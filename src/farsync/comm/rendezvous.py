"""How the workers of one run find each other.

Two ways: all M workers simulated in this process (an :class:`InProcessGroup`), or one
worker per process launched by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT`` and ``LOCAL_RANK``): the default process group is
created here (gloo on CPU, NCCL on GPU) and the exchange gets a
:class:`~farsync.comm.distributed.TorchDistributedCommunicator`.

A :class:`Group` is what the training loop holds: the communicators of the workers this
process drives, and the few collectives the loop itself needs (a metrics sum it collects
later, a run name chosen by rank 0, a barrier before a checkpoint is committed, every
worker's summary). The loop never imports ``torch.distributed``.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from farsync.comm.base import Communicator, completed_future
from farsync.comm.inprocess import InProcessGroup


class WorkerLost(RuntimeError):
    """Under torchrun, this worker lost the others: one died or its link broke (the
    torchrun path has no fault tolerance); `farsync train` prints it as one line."""


#: what gloo and NCCL say when a peer's connection goes
_LOST = ("Connection reset", "Connection closed", "Connection refused", "Broken pipe", "closed by peer", "Gloo", "gloo",
         "NCCL", "Socket Timeout", "timed out", "Timed out")


def lost_peer(e: BaseException) -> str | None:
    """The gist of ``e`` if it is a collective failing because a peer went (one line),
    else None."""
    import re

    import torch.distributed as dist

    msg = str(e).strip()
    dist_error = getattr(dist, "DistError", ())
    if not (isinstance(e, dist_error) or any(s in msg for s in _LOST)):
        return None
    first = msg.splitlines()[0] if msg else type(e).__name__
    first = re.sub(r"^(\[[^\]]*\]\s*)+", "", first)  # gloo's [file.cc:line] prefix
    return first.split(". This is typically")[0].rstrip(". ")[:200]


def launched_by_torchrun() -> bool:
    """True when this process is one worker of a ``torchrun`` launch."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def local_rank() -> int:
    """This process's index on its machine (picks its GPU); 0 outside torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0"))


@dataclass(frozen=True)
class SiteInfo:
    """This process's place in a worker that is a site of several ranks (torchrun
    started W × R processes for W workers): site rank ``rank`` of ``size``, and the
    process group of the site's ranks the model's gradients are reduced over (DDP, FSDP)."""

    rank: int
    size: int
    group: object


@dataclass
class Group:
    """The workers this process drives and how it reaches the others."""

    rank: int  # process rank (0 when simulating in-process)
    workers: int  # M, all workers of the run
    distributed: bool
    comms: list[Communicator] = field(default_factory=list)  # one per local worker
    local_ranks: list[int] = field(default_factory=list)  # the workers' ranks
    owns_process_group: bool = False  # join() created the default process group
    # an elastic run (join_elastic): one worker per process, with no process group shared
    # by the run; each process logs, sums metrics and checkpoints for its own worker
    elastic: bool = False
    site: SiteInfo | None = None  # a worker of several ranks: this process is one of them

    @property
    def site_size(self) -> int:
        """R: ranks per worker (1 but for sites)."""
        return self.site.size if self.site else 1

    def file_id(self, worker: int) -> str | int:
        """What names worker ``worker``'s checkpoint file on this process: the worker, or
        for a site the worker and this rank (every rank keeps its own)."""
        return worker if self.site is None else f"{worker}.r{self.site.rank}"

    @property
    def is_main(self) -> bool:
        return self.rank == 0 or self.elastic

    @property
    def _shared(self) -> bool:
        """The processes of the run share a process group (torchrun)."""
        return self.distributed and not self.elastic

    @property
    def backend(self) -> str:
        """How the workers meet, for the summary."""
        return "elastic (torchft)" if self.elastic else "torch.distributed" if self.distributed else "in-process"

    @property
    def checkpoint_workers(self) -> list[int]:
        """The workers whose files make this run directory's checkpoint complete: all of
        them, but for an elastic worker, which keeps its own."""
        if self.elastic:
            return list(self.local_ranks)
        if self.site is None:
            return list(range(self.workers))
        return [f"{w}.r{r}" for w in range(self.workers) for r in range(self.site.size)]

    @property
    def summed_workers(self) -> int:
        """How many workers a metrics sum (:meth:`all_sum_async`) adds up."""
        return len(self.local_ranks) if self.elastic else self.workers

    def all_sum_async(self, values: list[float]) -> Future:
        """Start a sum over processes (metrics; not counted as exchange bytes); a Future
        of the sums, the same bits on every process. In-process (and elastic, where each
        worker reports its own): already done."""
        return self.comms[0].all_sum_floats_async(values) if self._shared else completed_future(list(values))

    def broadcast(self, obj):
        """Rank 0's ``obj`` (plain data: what JSON holds) on every process."""
        if not self._shared:
            return obj
        import torch.distributed as dist

        dev = _device()
        data = _to_json_tensor(obj if self.rank == 0 else None, dev)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=dev)
        dist.broadcast(size, src=0)
        if self.rank != 0:
            data = torch.empty(int(size), dtype=torch.uint8, device=dev)
        dist.broadcast(data, src=0)
        return _from_json_tensor(data)

    def gather_workers(self, local: list) -> list:
        """One object per local worker (``local``, in ``local_ranks`` order; plain data) →
        every worker's, by worker: in-process and elastic, ``local`` itself."""
        if not self._shared:
            return list(local)
        import torch.distributed as dist

        dev, n = _device(), dist.get_world_size()
        data = _to_json_tensor(local, dev)
        sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(n)]
        dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64, device=dev))
        longest = max(int(s) for s in sizes)
        got = [torch.empty(longest, dtype=torch.uint8, device=dev) for _ in range(n)]
        dist.all_gather(got, torch.nn.functional.pad(data, (0, longest - data.numel())))
        return [x for g, s in zip(got, sizes) for x in _from_json_tensor(g[: int(s)])]

    def barrier(self) -> None:
        if self._shared:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Release the communicators, and the default process group if :func:`join`
        created it (a process that exits with a gloo group alive can abort in its
        teardown). Not a collective: it runs on error paths too, so call
        :meth:`barrier` first where every worker gets here."""
        for c in self.comms:
            c.close()
        self.comms = []
        if self.owns_process_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_process_group = False


def _device() -> torch.device:
    """Where the default group's tensors live (NCCL: this process's GPU)."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _to_json_tensor(obj, dev: torch.device) -> torch.Tensor:
    """``obj`` as the bytes of its JSON text, in a uint8 tensor: what crosses between
    processes is data, never a pickle."""
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(dev)


def _from_json_tensor(t: torch.Tensor):
    return json.loads(bytes(t.cpu().numpy()).decode())


def join(workers: int, *, device_type: str = "cpu", sharded: bool = False) -> Group:
    """The group of a run of M = ``workers``: under torchrun, this process's worker
    (creating the default process group if needed); otherwise all M, in-process.

    torchrun may start W × R processes for W workers: then each worker is a site of R
    ranks (global ranks w·R … w·R + R − 1: ``--nnodes=W --nproc-per-node=R``, one agent
    per site), and this process is one rank of one (:mod:`farsync.comm.site`: its
    exchange runs over its cross-site group, ``sharded`` when FSDP shards the parameters).
    ValueError when the processes are not a multiple of M.
    """
    if not launched_by_torchrun():
        group = InProcessGroup(workers)
        return Group(0, workers, False, group.communicators(), list(range(workers)))
    import torch.distributed as dist

    from farsync.comm.distributed import TorchDistributedCommunicator

    world = int(os.environ["WORLD_SIZE"])
    if world % workers:
        raise ValueError(
            f"algo.workers = {workers} but torchrun started {world} processes; start W × R processes for W "
            f"workers of R ranks each (--nnodes/--nproc-per-node), or set --algo.workers to match"
        )
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    rank = dist.get_rank()
    R = world // workers
    if R == 1:
        return Group(rank, workers, True, [TorchDistributedCommunicator()], [rank], owns)
    from farsync.comm.site import Site, SiteCommunicator

    w, r = divmod(rank, R)
    # every process creates every group, in the same order (torch.distributed's rule)
    train = [dist.new_group([v * R + i for i in range(R)]) for v in range(workers)]  # the model's gradients
    inner = [dist.new_group([v * R + i for i in range(R)]) for v in range(workers)]  # the exchange thread's
    cross = [dist.new_group([v * R + i for v in range(workers)]) for i in range(R)]  # rank i of every site
    control = dist.new_group()  # metrics, over every process
    comm = SiteCommunicator(groups=(cross[r], control), site=Site(r, R, inner[w]), sharded=sharded)
    return Group(rank, workers, True, [comm], [w], owns, site=SiteInfo(r, R, train[w]))


def join_elastic(workers: int, worker: int, *, lighthouse: str, timeout_s: float, connect_timeout_s: float,
                 quorum_timeout_s: float, min_workers: int, host: str = "", secret: bytes | None = None) -> Group:
    """Worker ``worker`` (a stable id in [0, ``workers``)) of an elastic run: this
    process's endpoint on torchft (:class:`~farsync.comm.elastic.ElasticCommunicator`).
    ``worker`` < 0 takes ``$FARSYNC_WORKER``. ``secret``: every sync's members and every
    heal prove it (:mod:`farsync.comm.heal`)."""
    from farsync.comm.elastic import ElasticCommunicator, lighthouse_address

    if worker < 0:
        if "FARSYNC_WORKER" not in os.environ:
            raise ValueError("elastic runs need a worker id: set elastic.worker (or $FARSYNC_WORKER)")
        worker = int(os.environ["FARSYNC_WORKER"])
    comm = ElasticCommunicator(worker, workers, lighthouse=lighthouse_address(lighthouse), timeout_s=timeout_s,
                               connect_timeout_s=connect_timeout_s, quorum_timeout_s=quorum_timeout_s,
                               min_workers=min_workers, host=host or None, secret=secret)
    return Group(worker, workers, True, [comm], [worker], elastic=True)
