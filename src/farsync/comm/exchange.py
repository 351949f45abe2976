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
once): all-gather for M = 2, reduce-scatter for M ≥ 3.

Before the data, workers exchange their weights (one float64 each, an all-gather):
this gives the weighted mean Σ w_m x_m / Σ w_m and lets a worker flag its contribution
as invalid (NaN weight) so *every* worker skips the data phase and raises the same error,
instead of one worker raising while the others hang in a collective.

Buffers are zero-padded to a multiple of M × codec.alignment so shards and codec blocks
line up; the padding travels and is counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from farsync.codecs import Codec
from farsync.schedule import EXCHANGES

#: bytes of one worker's weight in the control exchange
WEIGHT_NBYTES = 8


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
        method = "all-gather" if ag_bytes <= rs_bytes else "reduce-scatter"
    control = (m - 1) * WEIGHT_NBYTES
    if method == "all-gather":
        return ExchangePlan(numel, m, method, ag_padded, ag_padded,
                            codec.encoded_nbytes(ag_padded), ag_bytes, control)
    return ExchangePlan(numel, m, method, rs_padded, rs_shard,
                        codec.encoded_nbytes(rs_shard), rs_bytes, control)


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


def weighted_sum(
    codec: Codec, payloads: list[torch.Tensor], numel: int, weights: list[float]
) -> torch.Tensor:
    """Decode payloads (by source rank) and accumulate in FP32, in rank order.

    Equal weights give the plain mean (Σ x_m) / M, so that the uniform case is exactly
    the arithmetic mean and does not depend on how weights were normalised.
    """
    total = sum(weights)
    uniform = all(w == weights[0] for w in weights)
    # copy: decode may return a view of the payload (fp32), which must stay intact
    acc = codec.decode(payloads[0], numel).to(torch.float32, copy=True)
    if not uniform:
        acc = acc * (weights[0] / total)
    for r in range(1, len(payloads)):
        x = codec.decode(payloads[r], numel)
        if uniform:
            acc.add_(x)
        else:
            acc.add_(x, alpha=weights[r] / total)
    if uniform:
        acc.div_(len(payloads))
    return acc


def reduce_shard(
    plan: ExchangePlan,
    codec: Codec,
    payloads: list[torch.Tensor],
    weights: list[float],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Reduce-scatter phase 2 on the shard's owner: decode M copies, mean in FP32,
    re-encode for the all-gather."""
    reduced = weighted_sum(codec, payloads, plan.shard_numel, weights)
    return codec.encode(reduced, generator=generator)


def assemble(plan: ExchangePlan, codec: Codec, reduced_payloads: list[torch.Tensor]) -> torch.Tensor:
    """Decode the M reduced shards (by shard index) into the caller-sized mean."""
    parts = [codec.decode(p, plan.shard_numel) for p in reduced_payloads]
    return torch.cat(parts)[: plan.numel]


def mean_of_full(
    plan: ExchangePlan, codec: Codec, payloads: list[torch.Tensor], weights: list[float]
) -> torch.Tensor:
    """All-gather: every worker decodes all M whole payloads and averages."""
    return weighted_sum(codec, payloads, plan.padded_numel, weights)[: plan.numel]


def validate_weight(weight: float) -> None:
    if not (weight != weight or weight > 0):  # NaN (invalid flag) or positive
        raise ValueError(f"exchange weight must be > 0 (got {weight})")
