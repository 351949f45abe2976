"""The arithmetic of one quantized mean, shared by every backend.

Two ways to average an fp32 buffer of N values across M workers under a codec:

``reduce-scatter`` (two phases, what a ring all-reduce does):
    1. each worker cuts its buffer into M shards, encodes each, and sends shard j to
       worker j (an all-to-all);
    2. worker j decodes the M copies of shard j, accumulates them **in FP32 in rank
       order**, divides, re-encodes the reduced shard, and sends it to everyone (an
       all-gather). Every worker then decodes all M reduced shards — the same bytes — so
       all hold bit-identical results.
    Each worker sends 2·(M−1) encoded shards ≈ 2(M−1)/M of one full payload.
    Lossy codecs quantize twice (before and after the reduction).

``all-gather`` (one phase):
    every worker sends its whole encoded buffer to every other worker and each decodes
    and accumulates all M in rank order. Each worker sends (M−1) full payloads; lossy
    codecs quantize once.

``auto`` picks whichever sends fewer bytes (all-gather on ties, since it quantizes
once): all-gather for M = 2, reduce-scatter for M ≥ 3 — and all-gather, always, for a
sparse codec (``topk*``). Sparse payloads travel by all-gather only: reduce-scatter would
re-encode each shard's sum, and the top-k of a sum of M top-k sets drops most of what the
workers sent (their error feedback never sees that loss), so it is refused.

Before the data, workers exchange their weights and the exchange's tag (two float64
each, an all-gather; the tag is a hash of the round, the size, the codec, the method and
the aggregation, so that workers in different exchanges stop with an error instead of
mixing their payloads). The weights give the weighted mean Σ w_m x_m / Σ w_m (w_m: e.g. the tokens worker m trained on
since its last sync). A worker of weight 0 takes no part in the round (partial
participation): it sends no payload, and still receives the result. NaN flags a
contribution its sender knows to be invalid; it sends nothing either.

The receiving side decides what counts (:class:`Aggregation`): whoever decodes a
contribution checks it — non-finite values, or a norm per unit of weight more than
``outlier_factor`` × the lower median of the senders' — and leaves it out; every worker reaches the same
decision, because it sees the same decoded values (all-gather) or the same per-shard
statistics (reduce-scatter: each shard's owner computes every sender's sum of squares
and finiteness on its shard, and the owners exchange them, 2M float64 each, before
reducing). A faulty worker need not know it is faulty. If fewer than
``min_contributions`` remain, the round is *skipped*: no mean, and the caller leaves θ_g
as it was.

Buffers are zero-padded to a multiple of M × codec.alignment so shards and codec blocks
line up; the padding travels and is counted.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import torch

from farsync.codecs import Codec
from farsync.schedule import EXCHANGES

#: bytes one worker sends each peer before the payloads: its weight and the exchange's
#: tag (:func:`exchange_tag`), a float64 each
HANDSHAKE_NBYTES = 16
#: bytes of one (sum of squares, finite) pair of a shard's statistics
STAT_NBYTES = 16
#: how contributions are combined (see :class:`Aggregation`)
AGGREGATIONS = ("mean", "trimmed-mean", "median")


@dataclass(frozen=True)
class Aggregation:
    """How the receivers combine the contributions of one exchange.

    ``rule``: ``mean`` (weighted by the senders' weights), or, coordinate by coordinate
    and unweighted, ``trimmed-mean`` (drop the ⌊``trim``·K⌋ largest and smallest of the K
    values kept, average the rest) or ``median`` (the mean of the two middle values for
    even K). Both methods allow every rule: a shard's owner holds all senders' copies of
    its shard.
    ``check_finite``: leave out a contribution with a non-finite value (else its sender
    must flag it with a NaN weight).
    ``outlier_factor``: leave out a contribution whose L2 norm per unit of weight (per
    token, with token weights) exceeds this many times the lower median of the finite
    senders' (None: no norm rule). Per unit of weight, so that a worker that trained
    more steps, and so moved further, is not taken for an outlier; with equal weights
    it is the plain norm. The lower median keeps the rule meaningful for two senders:
    the larger is out if it is more than ``outlier_factor`` × the smaller.
    ``min_contributions``: a round with fewer contributions kept is skipped.
    """

    rule: str = "mean"
    check_finite: bool = True
    outlier_factor: float | None = 10.0
    trim: float = 0.2
    min_contributions: int = 1

    def __post_init__(self):
        if self.rule not in AGGREGATIONS:
            raise ValueError(f"aggregation rule must be one of {', '.join(AGGREGATIONS)} (got {self.rule!r})")
        if self.outlier_factor is not None and not self.outlier_factor > 1:
            raise ValueError(f"outlier_factor must be > 1 or None (got {self.outlier_factor})")
        if not 0 <= self.trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5) (got {self.trim})")
        if self.min_contributions < 1:
            raise ValueError(f"min_contributions must be >= 1 (got {self.min_contributions})")

    @property
    def needs_stats(self) -> bool:
        """Whether the receivers need every sender's norm and finiteness."""
        return self.check_finite or self.outlier_factor is not None


#: what data-parallel uses: every gradient counts; a worker flags its own non-finite one
PLAIN = Aggregation(check_finite=False, outlier_factor=None)


@dataclass(frozen=True)
class Decision:
    """Who counts in one exchange; identical on every worker."""

    kept: tuple[int, ...]  # ranks whose contribution is in the result
    excluded: tuple[tuple[int, str], ...]  # (rank, why) of senders left out
    skipped: bool  # fewer than min_contributions kept: no result


def senders(weights: list[float]) -> list[int]:
    """Ranks that send a payload: positive weight (0: not in this round; NaN: flagged)."""
    return [r for r, w in enumerate(weights) if w > 0]


def shard_stats(decoded: dict[int, torch.Tensor], world_size: int) -> torch.Tensor:
    """(M, 2) float64: each sender's sum of squares and finiteness (1/0) on one shard
    (rows of non-senders: 0, 1)."""
    out = torch.zeros(world_size, 2, dtype=torch.float64)
    out[:, 1] = 1.0
    for r, x in decoded.items():
        finite = bool(torch.isfinite(x).all())
        out[r, 1] = float(finite)
        out[r, 0] = float(x.double().square().sum()) if finite else math.inf
    return out


def decide(agg: Aggregation, weights: list[float], stats: list[torch.Tensor] | None) -> Decision:
    """Apply ``agg``'s rules to every sender, from the per-shard ``stats`` (by shard, as
    :func:`shard_stats` makes them; None when ``agg`` needs none)."""
    excluded = [(r, "flagged non-finite by its sender") for r, w in enumerate(weights) if w != w]
    cands = senders(weights)
    if stats is not None:
        sumsq = {r: sum(float(s[r, 0]) for s in stats) for r in cands}  # shard order: same bits everywhere
        finite = {r: all(bool(s[r, 1]) for s in stats) for r in cands}
        if agg.check_finite:
            excluded += [(r, "non-finite values") for r in cands if not finite[r]]
            cands = [r for r in cands if finite[r]]
        if agg.outlier_factor is not None and cands:
            # per unit of weight: a worker that trained 20 steps sends a larger Δ than one
            # that trained 2, and neither is an outlier for that (equal weights: plain norms)
            norms = {r: math.sqrt(sumsq[r]) / weights[r] for r in cands}
            med = sorted(norms.values())[(len(cands) - 1) // 2]  # lower median
            if med > 0:
                limit = agg.outlier_factor * med
                out = [r for r in cands if norms[r] > limit]
                excluded += [(r, f"norm per unit weight {norms[r]:.4g} > {agg.outlier_factor:g} x median {med:.4g}")
                             for r in out]
                cands = [r for r in cands if r not in out]
    excluded.sort()
    return Decision(tuple(cands), tuple(excluded), len(cands) < agg.min_contributions)


def combine(agg: Aggregation, decoded: dict[int, torch.Tensor], weights: list[float],
            kept: tuple[int, ...]) -> torch.Tensor:
    """The kept contributions combined under ``agg.rule`` (fp32, in rank order)."""
    if agg.rule == "mean":
        return weighted_sum([decoded[r] for r in kept], [weights[r] for r in kept])
    x = torch.stack([decoded[r].to(torch.float32) for r in kept]).sort(dim=0).values
    k = len(kept)
    if agg.rule == "median":
        mid = x[(k - 1) // 2]
        return mid.clone() if k % 2 else (mid + x[k // 2]) / 2
    cut = int(agg.trim * k)
    return x[cut: k - cut].mean(dim=0)


@dataclass(frozen=True)
class ExchangePlan:
    """Sizes of one exchange; identical on every worker."""

    numel: int  # values in the caller's buffer
    world_size: int
    method: str  # "reduce-scatter" | "all-gather" | "none" (M = 1)
    padded_numel: int
    shard_numel: int  # values per shard (reduce-scatter) or padded_numel (all-gather)
    payload_nbytes: int  # encoded bytes of one shard (reduce-scatter) or one buffer
    bytes_sent: int  # payload bytes one worker sends in total
    control_bytes: int  # weight-exchange bytes one worker sends


def make_plan(numel: int, world_size: int, codec: Codec, method: str = "auto") -> ExchangePlan:
    """Plan the exchange of ``numel`` fp32 values among ``world_size`` workers."""
    if method not in EXCHANGES:
        raise ValueError(f"exchange method must be one of {', '.join(EXCHANGES)} (got {method!r})")
    check_sparse_method(codec.name, codec.sparse, method)
    m = world_size
    if m == 1:
        return ExchangePlan(numel, 1, "none", numel, numel, 0, 0, 0)
    align = codec.alignment
    # reduce-scatter: pad to M equal shards, each a whole number of codec blocks
    rs_padded = _round_up(numel, m * align)
    rs_shard = rs_padded // m
    rs_bytes = 2 * (m - 1) * codec.encoded_nbytes(rs_shard)
    # all-gather: pad to whole codec blocks only
    ag_padded = _round_up(numel, align)
    ag_bytes = (m - 1) * codec.encoded_nbytes(ag_padded)
    if method == "auto":
        method = "all-gather" if codec.sparse or ag_bytes <= rs_bytes else "reduce-scatter"
    control = (m - 1) * HANDSHAKE_NBYTES
    if method == "all-gather":
        return ExchangePlan(numel, m, method, ag_padded, ag_padded,
                            codec.encoded_nbytes(ag_padded), ag_bytes, control)
    return ExchangePlan(numel, m, method, rs_padded, rs_shard,
                        codec.encoded_nbytes(rs_shard), rs_bytes, control)


def exchange_tag(round: tuple | None, plan: ExchangePlan, codec: Codec, agg: Aggregation) -> float:
    """What every worker of one exchange computes alike: a 48-bit hash (exact as a
    float64) of the round, the number of values, the codec, the method and the
    aggregation. Workers whose tags differ are not in the same exchange."""
    what = [list(round) if round is not None else None, plan.numel, plan.method, codec.name, codec.alignment,
            codec.stochastic_rounding, asdict(agg)]
    return float(int.from_bytes(hashlib.blake2b(json.dumps(what).encode(), digest_size=6).digest(), "little"))


def check_tags(tags: list[float], me: int, round: tuple | None) -> None:
    """Refuse an exchange whose members' tags differ (RuntimeError naming the members)."""
    others = [j for j, t in enumerate(tags) if t != tags[me]]
    if others:
        raise RuntimeError(f"mismatched exchange: member(s) {others} are not in this member's exchange (round "
                           f"{round}, or another size, codec, method or aggregation): every worker must make the same "
                           "exchanges in the same order")


def check_sparse_method(codec: str, sparse: bool, method: str, option: str = "exchange") -> None:
    """A sparse codec travels by all-gather (see the module docstring): reduce-scatter is
    refused, in one line naming ``option``."""
    if sparse and method == "reduce-scatter":
        raise ValueError(f"{option}=reduce-scatter cannot carry the sparse codec {codec!r}: the top-k of each shard's "
                         f"sum would drop what the workers sent; use {option}=all-gather or auto")


def _round_up(n: int, k: int) -> int:
    return max(k, math.ceil(n / k) * k)


def pad(plan: ExchangePlan, buf: torch.Tensor) -> torch.Tensor:
    """Flat fp32 copy of ``buf`` zero-padded to ``plan.padded_numel``."""
    out = torch.zeros(plan.padded_numel, dtype=torch.float32, device=buf.device)
    out[: plan.numel].copy_(buf.reshape(-1))
    return out


def encode_contribution(
    plan: ExchangePlan, codec: Codec, padded: torch.Tensor, generator: torch.Generator | None
) -> list[torch.Tensor]:
    """Phase 1 payloads of one worker: one per destination shard (reduce-scatter) or
    a single whole-buffer payload (all-gather)."""
    if plan.method == "all-gather":
        return [codec.encode(padded, generator=generator)]
    shards = padded.view(plan.world_size, plan.shard_numel)
    return [codec.encode(shards[j].contiguous(), generator=generator) for j in range(plan.world_size)]


class DecodeBuffers:
    """Decode outputs reused from one exchange to the next (one per sender and size):
    on CPU a fresh output's page faults cost about as much as decoding fp4 into it.
    What :func:`combine` returns never aliases them. One per exchange thread."""

    def __init__(self):
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, slot: int, numel: int, device: torch.device) -> torch.Tensor:
        key = (slot, numel, str(device))
        if key not in self._bufs:
            if len(self._bufs) > 64:  # sizes change (fragments differ): keep it bounded
                self._bufs.clear()
            self._bufs[key] = torch.empty(numel, dtype=torch.float32, device=device)
        return self._bufs[key]


def decode_all(codec: Codec, payloads: dict[int, torch.Tensor], numel: int,
               buffers: DecodeBuffers | None = None, first_slot: int = 0) -> dict[int, torch.Tensor]:
    """Decode each sender's payload (by rank), into ``buffers`` (slots ``first_slot`` +
    rank) when given."""
    if buffers is None:
        return {r: codec.decode(p, numel) for r, p in payloads.items()}
    return {r: codec.decode(p, numel, out=buffers.get(first_slot + r, numel, p.device)) for r, p in payloads.items()}


def weighted_sum(xs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ w_m x_m / Σ w_m, accumulated in FP32 in the order given.

    Equal weights give the plain mean (Σ x_m) / K, so that the uniform case is exactly
    the arithmetic mean and does not depend on how weights were normalised.
    """
    total = sum(weights)
    uniform = all(w == weights[0] for w in weights)
    # copy: decode may return a view of the payload (fp32), which must stay intact
    acc = xs[0].to(torch.float32, copy=True)
    if not uniform:
        acc = acc * (weights[0] / total)
    for x, w in zip(xs[1:], weights[1:]):
        if uniform:
            acc.add_(x)
        else:
            acc.add_(x, alpha=w / total)
    if uniform:
        acc.div_(len(xs))
    return acc


def assemble(plan: ExchangePlan, codec: Codec, reduced_payloads: list[torch.Tensor]) -> torch.Tensor:
    """Decode the M reduced shards (by shard index) into the caller-sized mean."""
    parts = [codec.decode(p, plan.shard_numel) for p in reduced_payloads]
    return torch.cat(parts)[: plan.numel]


def bytes_sent(plan: ExchangePlan, sender: bool, skipped: bool) -> int:
    """Payload bytes one worker really sends: its own payload only if it is a sender;
    a reduced shard (reduce-scatter) only if the round is not skipped."""
    if plan.method == "none":
        return 0
    if plan.method == "all-gather":
        return plan.bytes_sent if sender else 0
    one_phase = plan.bytes_sent // 2
    return one_phase * sender + one_phase * (not skipped)


def control_bytes(plan: ExchangePlan, agg: Aggregation) -> int:
    """Control bytes one worker sends: its weight, and (reduce-scatter with statistics)
    its shard's statistics of every sender."""
    if plan.method != "reduce-scatter" or not agg.needs_stats:
        return plan.control_bytes
    return plan.control_bytes + (plan.world_size - 1) * plan.world_size * STAT_NBYTES


def solo(agg: Aggregation, buf: torch.Tensor, weight: float) -> tuple[torch.Tensor, Decision]:
    """M = 1: the worker's own buffer, under the same rules (it may be left out too)."""
    x = buf.reshape(-1).to(torch.float32, copy=True)
    stats = [shard_stats({0: x}, 1)] if agg.needs_stats and weight > 0 else None
    d = decide(agg, [weight], stats)
    return (torch.empty(0) if d.skipped else x), d


def validate_weight(weight: float) -> None:
    if not (weight != weight or weight >= 0):  # NaN (flagged invalid), 0 (not in this round) or positive
        raise ValueError(f"exchange weight must be >= 0 (got {weight})")
