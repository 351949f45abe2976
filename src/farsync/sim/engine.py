"""The step DAG of Streaming DiLoCo §3.1, scheduled on one compute stream and one link.

Per inner step, for blocks l = 0 … L-1 (4L - 1 nodes):

    F_l   forward                      compute stream, order F_0 … F_{L-1}
    BA_l  backward wrt activations     compute stream, l = L-1 … 1 (F_0's input needs none)
    BP_l  backward wrt parameters      compute stream, after BA_l
    R_l   (outer) gradient reduction   link, only on steps where block l is synced

Each compute node lasts step_time / (3L - 1), so the nodes of one step add up to the
pure-compute step time (forward : backward = 1 : 2). Dependencies:

    R_l(s)  starts after BP_l(s)            ("per-layer": the reduction overlaps the rest
                                             of the backward pass, as in the paper), or
            after the whole backward of s   ("after-backward": one collective per sync)
    F_l(s + 1 + τ)  waits for R_l(s)        (the outer update of block l must land before
                                             block l's forward; τ = 0 without overlap)

The link carries one collective at a time, first come first served; only the bandwidth
between workers (datacenters) is modelled.

A worker may be a site of R ranks (``ranks``; farsync's ``comm/site.py``): its buffer is
cut into R shards, and rank r exchanges shard r with rank r of the other workers over
its own stream, the R streams at once, each 1/R of the bytes. ``links = "shared"`` (the
default): the R streams share the site's link of ``bandwidth_gbps``, each getting 1/R of
it, so a collective takes as long as one stream carrying everything; ``"per-rank"``: each
rank has a link of its own of ``bandwidth_gbps`` (R × the bandwidth in all), so it takes
1/R of that. Latency is paid once (the streams run side by side), TCP's ramp-up per
stream. Traffic inside a site (DDP's gradients, FSDP's gathers, the mean shards gathered
back) is on the fast link and not modelled: ``step_time`` is the site's step. A collective of B bytes takes
``factor(M) · 8B / bandwidth + latency cost`` with ring all-reduce factor 2(M-1)/M. The
latency cost is the paper's ring (``latency_model="hops"``: 2(M-1) hops of one-way
latency each; for M = 2 the payload once, two latencies) or farsync's own exchange
(``latency_model="phases"``): every worker talks to every other at once, receives posted
before sends, so a phase costs one round trip whatever M is, and an exchange has 2 of them
for all-gather (the weights, then the payloads) and 3 for reduce-scatter (weights, shards,
reduced shards). With ``tcp_slow_start`` an exchange also pays TCP's ramp-up: Linux
(``net.ipv4.tcp_slow_start_after_idle = 1``, the default) shrinks a connection's window
back to 10 segments after an idle retransmission timeout, which a link idle between syncs
always exceeds, and the window then doubles once per round trip (:func:`slow_start_extra_s`).

Which blocks sync when:
    dp         every block, every step (the gradient).
    diloco     every block at the end of every H-th step (pseudo-gradient).
    streaming  P fragments; fragment p syncs at the end of steps k·H + t_p, with offset
               t_p = floor(p·H / P) (floor because H/P need not be whole: H = 100, P = 8
               in the paper). Offsets, the τ bound and the block → fragment assignment
               come from farsync.schedule, as in training: the simulator accepts and
               refuses exactly the settings `farsync train` does.

Utilization = compute time / wall time in the periodic steady state (one period is H
steps, or one step for DP), which the simulation reaches by repeating periods until two
consecutive ones take the same time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from farsync.schedule import (
    EXCHANGES,
    FRAGMENT_PATTERNS,
    MODES,
    block_fragments,
    check_choice,
    check_schedule,
    fragment_offsets,
)
from farsync.sim.model import LAYERS_PER_FRAGMENT, PAPER_INNER_STEPS, ModelSpec, SimInputError
from farsync.sim.wire import WIRE_FORMATS, WireFormat, wire_format

#: When a block's reduction starts: as soon as its parameter gradient is ready, or
#: after the whole backward pass.
#: when a sync's reductions start: per block as its gradient is ready, or after the backward pass
REDUCTIONS = ("per-layer", "after-backward")

#: Wire codec for every method except the FP4 one. bf16, not fp32: see BENCHMARKS.md —
#: with fp32 every cell of the paper's 1B row is 4-6 grid steps too high, with bf16 all
#: are within one step. It is a parameter (`codec`); pass "fp32" for fp32 exchange.
DEFAULT_CODEC = "bf16"
#: Two workers (datacenters), as in the paper's 1B headline run; for M = 2 a ring
#: all-reduce moves exactly one payload each way.
DEFAULT_WORKERS = 2
#: How a collective pays latency: "hops" (a ring, the paper's) or "phases" (farsync's
#: exchange: one round trip per phase, all peers at once).
LATENCY_MODELS = ("hops", "phases")
#: How the R streams of a site reach the other sites: one link they share (its bandwidth
#: is ``bandwidth_gbps``), or a link per rank (each of ``bandwidth_gbps``).
LINKS = ("shared", "per-rank")
#: TCP's initial congestion window (Linux: 10 segments of 1448 payload bytes).
TCP_INITIAL_WINDOW_BYTES = 10 * 1448


def exchange_phases(method: str) -> int:
    """Round trips of one farsync exchange: the weights' all-gather, then the payloads
    (all-gather), or the shards and the reduced shards (reduce-scatter)."""
    return 2 if method == "all-gather" else 3


def slow_start_extra_s(nbytes: float, bandwidth_bps: float, rtt_s: float,
                       initial_window: float = TCP_INITIAL_WINDOW_BYTES) -> float:
    """Seconds a transfer of ``nbytes`` over one TCP connection takes beyond
    ``8·nbytes / bandwidth_bps`` when it starts from the initial window: the window
    (bytes per round trip) doubles each round trip until it fills the bandwidth-delay
    product, and the rest goes at the full rate. 0 when rtt_s is 0."""
    if nbytes <= 0 or rtt_s <= 0:
        return 0.0
    rate = bandwidth_bps / 8  # bytes/s
    bdp = rate * rtt_s
    window, sent, t = float(initial_window), 0.0, 0.0
    while window < bdp and sent < nbytes:
        sent += window
        t += rtt_s
        window *= 2
    total = t + max(0.0, nbytes - sent) / rate if sent < nbytes else t
    return max(0.0, total - nbytes / rate)


@dataclass(frozen=True)
class SimConfig:
    """One simulated training setup. Paper symbols: M = workers, H = inner_steps,
    P = fragments, τ = sync_delay (the names `farsync train` uses too).

    model: layers, parameters, pure-compute step time.
    mode: 'dp' | 'diloco' | 'streaming'.
    workers: M, replicas joined by the simulated link (M = 1: no communication).
    inner_steps: H, inner steps between two syncs of the same parameters (ignored by dp).
    fragments: P (streaming only); None = layers // 3, the paper's 3 layers per fragment.
        Must divide the layer count and be at most H.
    sync_delay: τ, inner steps the workers keep computing before they need a fragment's
        reduced result; 0 <= τ < H / P (farsync.schedule.min_sync_gap). Ignored by dp.
    codec: wire format of the exchanged values (see farsync.sim.wire).
    bandwidth_gbps: link bandwidth between workers, Gbit/s (10^9 bit/s), each direction.
    latency_s: one-way latency per hop of a collective, seconds.
    reductions: 'per-layer' (a collective per block, started when its parameter gradient is
        ready; the paper's choice) or 'after-backward' (one collective per sync event,
        started when the step's backward pass ends).
    fragment_pattern: 'strided' (block l in fragment l mod P; the paper's default) or
        'sequential'.
    exchange: 'reduce-scatter' (the bytes of a ring all-reduce: 2(M-1)/M payloads per
        link, 2(M-1) hops), 'all-gather' (every worker's unreduced payload to every other:
        M-1 payloads per link, M-1 hops) or 'auto' (as farsync: all-gather for M <= 2).
    latency_model: 'hops' (each hop of a ring pays latency_s; the paper's) or 'phases'
        (farsync's exchange: each phase pays one round trip, 2·latency_s; see
        :func:`exchange_phases`).
    tcp_slow_start: every collective also pays TCP's ramp-up from the initial window on
        each of the M-1 connections a worker sends on (:func:`slow_start_extra_s`).
    sync_wait_s: seconds a worker waits, on every step that starts a sync, for the slowest
        worker to arrive (workers whose step times vary); the collective starts after it,
        and overlap cannot hide it (a worker that finished early stays ahead and waits
        again at the next sync). farsync's planner derives it from measured step times.
    count_scales: include codec block scales in the bytes sent.
    codec_block_size: values per codec scale block; None = farsync's codec default
        (32 for fp4, 64 for int8).
    ranks: R, ranks per worker (a site): every collective is R shards, each over its own
        stream, all at once (module docstring). 1 = one stream.
    links: 'shared' (the R streams share the site's link: bandwidth_gbps is the site's)
        or 'per-rank' (every rank has its own link of bandwidth_gbps).
    """

    model: ModelSpec
    mode: str = "streaming"
    workers: int = DEFAULT_WORKERS
    inner_steps: int = PAPER_INNER_STEPS
    fragments: int | None = None
    sync_delay: int = 0
    codec: str = DEFAULT_CODEC
    bandwidth_gbps: float = 1.0
    latency_s: float = 0.0
    reductions: str = "per-layer"
    fragment_pattern: str = "strided"
    exchange: str = "reduce-scatter"
    count_scales: bool = True
    codec_block_size: int | None = None
    latency_model: str = "hops"
    tcp_slow_start: bool = False
    sync_wait_s: float = 0.0
    ranks: int = 1
    links: str = "shared"

    def __post_init__(self) -> None:
        L = self.model.layers
        check_choice("mode", self.mode, MODES)
        if not isinstance(self.workers, int) or self.workers < 1:
            raise SimInputError("workers", self.workers, "must be an integer >= 1")
        if isinstance(self.ranks, bool) or not isinstance(self.ranks, int) or self.ranks < 1:
            raise SimInputError("ranks", self.ranks, "must be an integer >= 1 (ranks per worker)")
        check_choice("links", self.links, LINKS)
        if self.codec not in WIRE_FORMATS:
            raise SimInputError("codec", self.codec, f"choose from {', '.join(WIRE_FORMATS)}")
        if self.codec_block_size is not None and (
                not isinstance(self.codec_block_size, int) or self.codec_block_size < 1):
            raise SimInputError("codec_block_size", self.codec_block_size, "must be an integer >= 1")
        if not (isinstance(self.bandwidth_gbps, (int, float)) and self.bandwidth_gbps > 0
                and math.isfinite(self.bandwidth_gbps)):
            raise SimInputError("bandwidth_gbps", self.bandwidth_gbps, "must be a positive number")
        if not (self.latency_s >= 0 and math.isfinite(self.latency_s)):
            raise SimInputError("latency_s", self.latency_s, "must be >= 0 seconds")
        if not (self.sync_wait_s >= 0 and math.isfinite(self.sync_wait_s)):
            raise SimInputError("sync_wait_s", self.sync_wait_s, "must be >= 0 seconds")
        check_choice("reductions", self.reductions, REDUCTIONS)
        check_choice("fragment_pattern", self.fragment_pattern, FRAGMENT_PATTERNS)
        check_choice("exchange", self.exchange, EXCHANGES)
        if self.exchange == "reduce-scatter" and self.wire_format.sparse:
            raise SimInputError("exchange", self.exchange,
                                f"cannot carry the sparse codec {self.codec!r} (farsync refuses it): use all-gather or auto")
        check_choice("latency_model", self.latency_model, LATENCY_MODELS)
        if self.mode == "diloco" and self.fragments not in (None, 1):
            raise SimInputError("fragments", self.fragments, "mode 'diloco' syncs all parameters at once: must be 1")
        P = self.n_fragments
        # the rules training applies (farsync.schedule), then the simulator's own:
        # equal fragments, since the DAG spreads parameters evenly over the layers
        check_schedule(self.mode, inner_steps=self.inner_steps, fragments=P, sync_delay=self.sync_delay)
        if self.fragments is not None and self.mode == "streaming" and (P > L or L % P):
            raise SimInputError(
                "fragments", self.fragments,
                f"must divide the {L} layers into equal fragments (a divisor of {L})",
            )

    @property
    def n_fragments(self) -> int:
        """P actually used: 1 for dp and diloco."""
        if self.mode != "streaming":
            return 1
        if self.fragments is None:
            return max(1, self.model.layers // LAYERS_PER_FRAGMENT)
        return self.fragments

    @property
    def period(self) -> int:
        """Steps after which the sync pattern repeats."""
        return 1 if self.mode == "dp" else self.inner_steps

    @property
    def tau(self) -> int:
        """τ actually used: data-parallel has none."""
        return 0 if self.mode == "dp" else self.sync_delay

    @property
    def exchange_method(self) -> str:
        """'reduce-scatter' or 'all-gather' ('auto' resolved as farsync does: whichever
        sends fewer bytes, all-gather on ties, i.e. for M <= 2)."""
        if self.exchange != "auto":
            return self.exchange
        return "all-gather" if self.workers <= 2 or self.wire_format.sparse else "reduce-scatter"

    def fragment_layers(self) -> list[list[int]]:
        """Blocks of each fragment, fragment 0 first."""
        L, P = self.model.layers, self.n_fragments
        owner = block_fragments(L, P, self.fragment_pattern)
        return [[l for l in range(L) if owner[l] == p] for p in range(P)]

    def sync_table(self) -> dict[int, list[int]]:
        """Step index within one period -> blocks whose reduction starts on that step."""
        if self.mode == "dp":
            return {0: list(range(self.model.layers))}
        H, P = self.inner_steps, self.n_fragments
        table: dict[int, list[int]] = {}
        # fragment p is sent after (1-based) step k·H + t_p: 0-based step t_p − 1 (mod H)
        for offset, layers in zip(fragment_offsets(H, P), self.fragment_layers()):
            table.setdefault((offset - 1) % H, []).extend(layers)
        return table

    @property
    def stream_bandwidth_gbps(self) -> float:
        """What one of a worker's R streams gets while all R send: 1/R of a shared link,
        a whole link per rank."""
        return self.bandwidth_gbps / self.ranks if self.links == "shared" else self.bandwidth_gbps

    def collective_seconds(self, n_values: float) -> float:
        """Link time of one collective over `n_values` values (all workers, one event):
        R streams side by side, each carrying one shard (1/R of the values)."""
        M = self.workers
        if M == 1 or n_values <= 0:
            return 0.0
        rs = self.exchange_method == "reduce-scatter"
        factor, hops = (2 * (M - 1) / M, 2 * (M - 1)) if rs else (M - 1, M - 1)
        bytes_ = self.wire_format.wire_bytes(n_values / self.ranks, self.count_scales)  # one stream's shard
        bps = self.stream_bandwidth_gbps * 1e9
        seconds = factor * bytes_ * 8 / bps
        rtt = 2 * self.latency_s
        if self.latency_model == "phases":
            seconds += exchange_phases(self.exchange_method) * rtt
        else:
            seconds += hops * self.latency_s
        if self.tcp_slow_start:
            # each stream's payload goes out on M-1 connections at once, sharing its bandwidth
            seconds += slow_start_extra_s(factor * bytes_ / (M - 1), bps / (M - 1), rtt)
        return seconds

    def bytes_sent_per_worker(self, n_values: float) -> float:
        """Bytes one worker puts on the link in one collective over `n_values` values
        (its R streams together: R shards of n_values / R)."""
        M = self.workers
        if M == 1:
            return 0.0
        factor = 2 * (M - 1) / M if self.exchange_method == "reduce-scatter" else M - 1
        R = self.ranks
        return R * factor * self.wire_format.wire_bytes(n_values / R, self.count_scales)

    @property
    def wire_format(self) -> WireFormat:
        fmt = wire_format(self.codec)
        if self.codec_block_size is not None and fmt.scale_bits:
            fmt = replace(fmt, block=self.codec_block_size)
        return fmt


@dataclass(frozen=True)
class SimResult:
    """Steady-state figures for one SimConfig.

    utilization: compute time / wall time, in (0, 1].
    step_time_s: pure compute per inner step.
    wall_per_step_s: mean wall time per inner step (compute + time blocked on the link).
    link_busy_per_step_s: mean time the link is busy per step (hidden or not).
    bytes_per_step: mean bytes one worker sends per inner step.
    peak_sync_bytes: most bytes one worker sends in the collectives of one step.
    """

    config: SimConfig = field(repr=False)
    utilization: float
    step_time_s: float
    wall_per_step_s: float
    link_busy_per_step_s: float
    bytes_per_step: float
    peak_sync_bytes: float
    periods_simulated: int

    def wall_clock_s(self, tokens: float, tokens_per_step: float) -> float:
        """Wall-clock seconds to train on `tokens` tokens in all, each of the M workers
        consuming `tokens_per_step` tokens per inner step."""
        if not tokens_per_step > 0:
            raise SimInputError("tokens_per_step", tokens_per_step, "must be positive")
        steps = tokens / (self.config.workers * tokens_per_step)
        return steps * self.wall_per_step_s


def simulate(config: SimConfig, max_periods: int = 64) -> SimResult:
    """Run the step DAG until its timing repeats; return steady-state figures."""
    L = config.model.layers
    T = config.model.step_time
    unit = T / (3 * L - 1)  # one compute node
    period = config.period
    tau = config.tau
    per_layer = config.reductions == "per-layer"
    table = config.sync_table()
    layer_values = config.model.params / L
    layer_seconds = config.collective_seconds(layer_values)
    no_link = layer_seconds == 0.0

    t = 0.0  # compute stream: time the next node may start
    link = 0.0  # link: time it is next free
    pending: dict[int, dict[int, float]] = {}  # step -> {block: time its reduction ends}
    period_walls: list[float] = []
    step = 0
    start = 0.0
    for n_period in range(1, max_periods + 1):
        for _ in range(period):
            waits = pending.pop(step, None)
            sync = None if no_link else table.get(step % period)
            if not waits and not sync:
                t += T
                step += 1
                continue
            # forward F_0 … F_{L-1}; F_l may wait for R_l of an earlier step
            if waits:
                cur = 0
                for l in sorted(waits):
                    t += (l - cur) * unit
                    if waits[l] > t:
                        t = waits[l]
                    cur = l
                t += (L - cur) * unit
            else:
                t += L * unit
            fwd_end = t
            bwd_end = fwd_end + (2 * L - 1) * unit
            if sync and config.sync_wait_s:  # the slowest worker arrives this much later
                fwd_end += config.sync_wait_s
                bwd_end += config.sync_wait_s
            if sync:
                done: dict[int, float] = {}
                if per_layer:
                    for l in sorted(sync, reverse=True):
                        # BP_l ends after the BA/BP pairs of blocks L-1 … l (block 0: BP only)
                        ready = fwd_end + (2 * (L - l) - (1 if l == 0 else 0)) * unit
                        link = max(link, ready) + layer_seconds
                        done[l] = link
                else:
                    link = max(link, bwd_end) + config.collective_seconds(layer_values * len(sync))
                    done = dict.fromkeys(sync, link)
                target = pending.setdefault(step + 1 + tau, {})
                for l, end in done.items():
                    target[l] = max(target.get(l, 0.0), end)
            t = bwd_end
            step += 1
        period_walls.append(t - start)
        start = t
        if n_period >= 3 and math.isclose(period_walls[-1], period_walls[-2], rel_tol=1e-12, abs_tol=1e-15):
            break
    converged = len(period_walls) >= 2 and math.isclose(
        period_walls[-1], period_walls[-2], rel_tol=1e-12, abs_tol=1e-15
    )
    # not converged within max_periods (a timing that cycles over several periods):
    # average the last few
    wall = period_walls[-1] if converged else sum(period_walls[-4:]) / len(period_walls[-4:])

    sync_sizes = [len(v) for v in table.values()] if not no_link else []
    if per_layer:
        busy = sum(n * layer_seconds for n in sync_sizes)
        sent = sum(n * config.bytes_sent_per_worker(layer_values) for n in sync_sizes)
        peak = max((n * config.bytes_sent_per_worker(layer_values) for n in sync_sizes), default=0.0)
    else:
        busy = sum(config.collective_seconds(n * layer_values) for n in sync_sizes)
        sent = sum(config.bytes_sent_per_worker(n * layer_values) for n in sync_sizes)
        peak = max((config.bytes_sent_per_worker(n * layer_values) for n in sync_sizes), default=0.0)
    return SimResult(
        config=config,
        utilization=min(1.0, period * T / wall),
        step_time_s=T,
        wall_per_step_s=wall / period,
        link_busy_per_step_s=busy / period,
        bytes_per_step=sent / period,
        peak_sync_bytes=peak,
        periods_simulated=len(period_walls),
    )


# --- the five methods of Table 4 -------------------------------------------------------

#: Scale block of the paper's FP4 in the Table 4 methods: one scale per collective (per
#: tensor), so 4.00 bits per value. The paper's E3M0 is "4 bits" (1 sign, 3 exponent, no
#: mantissa) and it describes no block scales; a per-tensor scale costs 4 bytes per layer.
#: Until 2026-12-01 one fp32 scale per 128 values (4.25 bits/value) was assumed, an
#: invented granularity that put the FP4 rows of 10B/100B one step higher in 4 of 10
#: cells (BENCHMARKS.md, planner). farsync's own fp4 codec keeps one scale per 32 values
#: (5 bits/value) for accuracy: pass codec_block_size=None for it, as farsync's planner does.
PAPER_FP4_BLOCK = 2**30

#: Method name -> SimConfig fields it sets. Anything else keeps SimConfig's default.
METHODS: dict[str, dict] = {
    "dp": dict(mode="dp", sync_delay=0),
    "diloco": dict(mode="diloco", sync_delay=0),
    "streaming": dict(mode="streaming", sync_delay=0),
    "streaming-overlap": dict(mode="streaming", sync_delay=1),
    "streaming-overlap-fp4": dict(mode="streaming", sync_delay=1, codec="fp4-e3m0",
                                  codec_block_size=PAPER_FP4_BLOCK),
}

METHOD_LABELS = {
    "dp": "Data-parallel",
    "diloco": "DiLoCo",
    "streaming": "Streaming DiLoCo",
    "streaming-overlap": "Streaming DiLoCo + overlap (τ=1)",
    "streaming-overlap-fp4": "Streaming DiLoCo + overlap + FP4",
}


def method_config(model: ModelSpec, method: str, **overrides) -> SimConfig:
    """SimConfig for one of METHODS on `model`.

    `overrides` set any SimConfig field (codec, workers, inner_steps, latency_s,
    bandwidth_gbps, …) and win over the method's own, except that `sync_delay` (τ) only
    applies to the overlap methods and `fragments` (P) only to the streaming ones; None
    values are ignored."""
    if method not in METHODS:
        raise SimInputError("method", method, f"choose from {', '.join(METHODS)}")
    fields = dict(METHODS[method])
    overrides = {k: v for k, v in overrides.items() if v is not None}
    # τ belongs to the overlap methods; the others are τ = 0 by definition.
    if fields["sync_delay"] == 0:
        overrides.pop("sync_delay", None)
    # P belongs to the streaming methods.
    if fields["mode"] != "streaming":
        overrides.pop("fragments", None)
    fields.update(overrides)
    return SimConfig(model=model, **fields)


def with_bandwidth(config: SimConfig, bandwidth_gbps: float) -> SimConfig:
    """The same setup on a link of another bandwidth."""
    return replace(config, bandwidth_gbps=bandwidth_gbps)
