"""In-process backend: M simulated workers in one process, deterministic.

Workers are driven in *lock step* by one thread (see :mod:`farsync.train.loop`): every
worker launches an exchange before any worker waits for it, exactly as collectives are
matched in ``torch.distributed`` (the k-th call of every rank forms one operation). The
arithmetic is :mod:`farsync.comm.exchange`, the same the ``torch.distributed`` backend
runs, so both give bit-identical numbers for the same inputs.

``delay_s`` makes every exchange take at least that long after its last contribution
(wall clock): a stand-in for a slow link, to show that overlapping hides it.
"""

from __future__ import annotations

import math
import time

import torch

from farsync.codecs import Codec
from farsync.comm import exchange as ex
from farsync.comm.base import CompletedWork, Communicator, ExchangeRequest, ExchangeResult, Work


class _Op:
    def __init__(self, op_id: int, plan: ex.ExchangePlan, codec: Codec, agg: ex.Aggregation, world_size: int,
                 round: tuple | None):
        self.op_id = op_id
        self.plan = plan
        self.codec = codec
        self.agg = agg
        self.round = round
        self.payloads: list[list[torch.Tensor] | None] = [None] * world_size
        self.weights: list[float | None] = [None] * world_size
        self.generators: list[torch.Generator | None] = [None] * world_size
        self.arrived = 0
        self.mean: torch.Tensor | None = None
        self.decision: ex.Decision | None = None
        self.ready_at = math.inf


def _identity(codec: Codec) -> tuple:
    return codec.name, codec.alignment, codec.stochastic_rounding


class InProcessGroup:
    """The shared state of M simulated workers; hand one communicator to each."""

    def __init__(self, world_size: int, *, delay_s: float = 0.0):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1 (got {world_size})")
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0 (got {delay_s})")
        self.world_size = world_size
        self.delay_s = delay_s
        self._ops: dict[int, _Op] = {}
        self._next_op = [0] * world_size
        self._comms = [InProcessCommunicator(self, r) for r in range(world_size)]
        self._buffers = ex.DecodeBuffers()  # exchanges finish one at a time, in this thread

    def communicator(self, rank: int) -> "InProcessCommunicator":
        return self._comms[rank]

    def communicators(self) -> list["InProcessCommunicator"]:
        return list(self._comms)

    def _contribute(self, rank, buf, codec, weight, generator, method, round=None,
                    agg: ex.Aggregation = ex.PLAIN) -> "_InProcessWork":
        op_id = self._next_op[rank]
        self._next_op[rank] += 1
        plan = ex.make_plan(buf.numel(), self.world_size, codec, method)
        op = self._ops.get(op_id)
        if op is None:
            op = self._ops[op_id] = _Op(op_id, plan, codec, agg, self.world_size, round)
        elif op.plan != plan or _identity(op.codec) != _identity(codec):
            raise RuntimeError(
                f"mismatched exchange #{op_id}: rank {rank} sent {plan.numel} values under "
                f"{codec.name!r}, others {op.plan.numel} under {op.codec.name!r}"
            )
        elif op.round != round:
            raise RuntimeError(f"mismatched exchange #{op_id}: rank {rank} is in round {round}, others in {op.round}")
        elif op.agg != agg:
            raise RuntimeError(f"mismatched exchange #{op_id}: rank {rank} aggregates by {agg}, others by {op.agg}")
        if weight > 0:  # a sender (0: not in this round; NaN: flagged invalid)
            op.payloads[rank] = ex.encode_contribution(plan, codec, ex.pad(plan, buf), generator)
        op.weights[rank] = float(weight)
        op.generators[rank] = generator
        op.arrived += 1
        if op.arrived == self.world_size:
            self._finish(op)
            del self._ops[op_id]
        return _InProcessWork(op, rank)

    def _finish(self, op: _Op) -> None:
        """What every rank of the torch.distributed backend computes, computed once."""
        weights = [float(w) for w in op.weights]  # type: ignore[arg-type]
        plan, codec, agg, m = op.plan, op.codec, op.agg, self.world_size
        senders = ex.senders(weights)
        if plan.method == "all-gather":
            decoded = ex.decode_all(codec, {r: op.payloads[r][0] for r in senders}, plan.padded_numel,  # type: ignore[index]
                                    self._buffers)
            stats = [ex.shard_stats(decoded, m)] if agg.needs_stats else None
            op.decision = ex.decide(agg, weights, stats)
            if not op.decision.skipped:
                op.mean = ex.combine(agg, decoded, weights, op.decision.kept)[: plan.numel]
        else:
            # shard j is checked and reduced by its owner, rank j, with rank j's generator
            decoded = [ex.decode_all(codec, {r: op.payloads[r][j] for r in senders}, plan.shard_numel,  # type: ignore[index]
                                     self._buffers, first_slot=j * m)
                       for j in range(m)]
            stats = [ex.shard_stats(d, m) for d in decoded] if agg.needs_stats else None
            op.decision = ex.decide(agg, weights, stats)
            if not op.decision.skipped:
                reduced = [codec.encode(ex.combine(agg, decoded[j], weights, op.decision.kept), generator=op.generators[j])
                           for j in range(m)]
                op.mean = ex.assemble(plan, codec, reduced)
        op.payloads = [None] * m  # free the encoded copies
        op.ready_at = time.perf_counter() + self.delay_s


class _InProcessWork(Work):
    def __init__(self, op: _Op, rank: int):
        self._op = op
        self._rank = rank
        self.bytes_sent = op.plan.bytes_sent
        self._result: ExchangeResult | None = None

    def wait(self) -> ExchangeResult:
        if self._result is not None:
            return self._result
        op = self._op
        if op.arrived < len(op.weights):
            raise RuntimeError(
                f"in-process exchange #{op.op_id}: rank {self._rank} waited before all "
                f"{len(op.weights)} workers contributed ({op.arrived} did). Drive simulated "
                "workers in lock step: every worker launches an exchange before any waits on it."
            )
        remaining = op.ready_at - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
        weights = tuple(float(w) for w in op.weights)  # type: ignore[arg-type]
        mean = op.mean.clone() if op.mean is not None else torch.empty(0)
        d = op.decision
        sent = ex.bytes_sent(op.plan, weights[self._rank] > 0, d.skipped)
        self._result = ExchangeResult(mean, weights, sent, ex.control_bytes(op.plan, op.agg), d.kept, d.excluded, d.skipped)
        return self._result


class InProcessCommunicator(Communicator):
    """Rank ``rank`` of an :class:`InProcessGroup`."""

    def __init__(self, group: InProcessGroup, rank: int):
        self._group = group
        self.rank = rank
        self.world_size = group.world_size

    def exchange(self, request: ExchangeRequest) -> Work:
        buf, codec, weight, method = request.buf, request.codec, request.weight, request.method
        ex.validate_weight(weight)
        if self.world_size == 1:
            mean, d = ex.solo(request.aggregation, buf.detach(), weight)
            return CompletedWork(ExchangeResult(mean, (float(weight),), 0, 0, d.kept, d.excluded, d.skipped))
        return self._group._contribute(self.rank, buf.detach().reshape(-1), codec, weight, request.generator,
                                       method, request.round, request.aggregation)
