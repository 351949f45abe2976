"""``torch.distributed`` backend: one process per worker (gloo on CPU, NCCL on GPU).

Exchanges run on a background thread over a process group of their own, so that with
a sync delay τ ≥ 1 the inner steps really compute while bytes are in flight, and the
main thread's own collectives (metrics) never interleave with them. One thread means
exchanges run in launch order on every rank, which is what matches them across ranks.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist

from farsync.codecs import Codec
from farsync.comm import exchange as ex
from farsync.comm.base import Communicator, ExchangeResult, Work


class _FutureWork(Work):
    def __init__(self, future: Future, bytes_sent: int):
        self._future = future
        self.bytes_sent = bytes_sent

    def wait(self) -> ExchangeResult:
        return self._future.result()

    def is_completed(self) -> bool:
        return self._future.done()


class TorchDistributedCommunicator(Communicator):
    """This process's endpoint; needs ``torch.distributed`` initialised (e.g. by torchrun).

    ``delay_s`` adds a sleep before every exchange, on the background thread — a test
    hook that stands in for a slow link.
    """

    def __init__(self, *, delay_s: float = 0.0):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: launch with torchrun, or call "
                "torch.distributed.init_process_group first"
            )
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.delay_s = delay_s
        # a group of its own: collectives of the exchange thread never interleave with
        # collectives the main thread issues on the default group
        self._group = dist.new_group(backend=dist.get_backend())
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="farsync-exchange")

    def all_reduce_mean(self, buf, codec, *, weight=1.0, generator=None, method="auto") -> Work:
        ex.validate_weight(weight)
        plan = ex.make_plan(buf.numel(), self.world_size, codec, method)
        padded = ex.pad(plan, buf.detach())  # a private copy: the caller may reuse buf
        future = self._executor.submit(self._run, plan, codec, padded, float(weight), generator)
        return _FutureWork(future, plan.bytes_sent)

    def _run(self, plan: ex.ExchangePlan, codec: Codec, padded: torch.Tensor, weight: float,
             generator: torch.Generator | None) -> ExchangeResult:
        if self.delay_s:
            time.sleep(self.delay_s)
        m, g = self.world_size, self._group
        if m == 1:
            return ExchangeResult(padded[: plan.numel], (weight,), 0, 0)
        w = torch.tensor([weight], dtype=torch.float64, device=padded.device)
        ws = [torch.empty_like(w) for _ in range(m)]
        dist.all_gather(ws, w, group=g)
        weights = tuple(float(x.item()) for x in ws)
        if any(x != x for x in weights):
            return ExchangeResult(torch.empty(0), weights, 0, plan.control_bytes)
        wl = list(weights)
        payloads = ex.encode_contribution(plan, codec, padded, generator)
        if plan.method == "all-gather":
            gathered = [torch.empty_like(payloads[0]) for _ in range(m)]
            dist.all_gather(gathered, payloads[0], group=g)
            mean = ex.mean_of_full(plan, codec, gathered, wl)
        else:
            send = torch.cat(payloads)
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send, group=g)
            mine = ex.reduce_shard(plan, codec, list(recv.view(m, plan.payload_nbytes)), wl, generator)
            gathered = [torch.empty_like(mine) for _ in range(m)]
            dist.all_gather(gathered, mine, group=g)
            mean = ex.assemble(plan, codec, gathered)
        return ExchangeResult(mean, weights, plan.bytes_sent, plan.control_bytes)

    def all_sum_floats(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return [float(x) for x in t.cpu()]

    def close(self) -> None:
        self._executor.shutdown(wait=True)
