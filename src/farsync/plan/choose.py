"""Choose H, P, τ and the codec for a link: the fewest bytes that still keep the compute busy.

Every setting inside the *safe region* (bounds on H, τ, P and the codecs; the defaults are
what the quality benchmark validated, see docs/PLANNING.md) is simulated with
:mod:`farsync.sim` as farsync runs it: the model's blocks and parameters, the measured
step time, the measured bandwidth, one exchange per fragment started after the inner
step (``reductions="after-backward"``), farsync's exchange method and codec sizes, one
round trip per exchange phase (``latency_model="phases"``) and TCP's ramp-up after an
idle link when the kernel restarts it (``tcp_slow_start``).

Workers whose steps take different times wait for each other at every sync; overlap
does not hide that (a worker that arrived early stays ahead and waits again next time).
The probe measures that wait: the workers train a few rounds of ``gap`` steps each, meeting
after every round as a sync would (:class:`SyncWait`), and every sync of a setting whose
syncs are g = H/P steps apart is charged wait × √(g / gap): step times that vary at random
drift apart as the square root of the steps between two meetings (measured on emulated
hosts: 39 ms at g = 5, 79 ms at g = 20; BENCHMARKS.md, "Planner validation").

A worker that is a site of R ranks sends every exchange as R shards over R streams at once
(``ranks``); ``links`` says whether they share the site's link (``"shared"``, the default)
or each rank has its own (``"per-rank"``). What the simulator is given as the bandwidth
(:func:`sim_bandwidth_bps`): the probe measured one stream while all R streams sent, so on
a shared link the site's link is R × the measured rate, and with a link per rank each
rank's is the measured rate: either way a stream's time is its shard ÷ the measured rate,
and the prediction is the same. A link given instead (``plan.bandwidth_mbit``) is the
site's link when shared, each rank's when per-rank.

The rule: among the settings predicted to reach the target utilization, the one that sends
the fewest bytes per step; on equal bytes (the same H and codec), the smaller τ (overlap
costs some quality: BENCHMARKS.md, quality), then the higher predicted utilization counted
in tenths of a point (finer differences are below what the model can tell), then fewer
fragments. If none reaches the target, the one with the highest predicted
utilization — settings within one point of it count as equal, and of those the fewest
bytes — reported as missing the target.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from farsync import sim
from farsync.codec_names import ALL_CODEC_NAMES
from farsync.schedule import check_choice
from farsync.plan.link import LinkMeasurement
from farsync.schedule import min_sync_gap

#: The codecs in the order they are listed (fewest bits first).
DEFAULT_CODECS = ("fp4-e3m0", "int8", "bf16", "fp32")
#: Bytes within this relative distance count as equal (the same H and codec).
SAME_BYTES_RTOL = 1e-9
#: No setting reaches the target: those predicted within this of the best count as equal.
UNREACHED_TOLERANCE = 0.01


def slow_start_after_idle() -> bool:
    """Whether this kernel restarts TCP's window after an idle period (Linux default 1)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_slow_start_after_idle") as f:
            return f.read().strip() != "0"
    except OSError:
        return True


@dataclass(frozen=True)
class SafeRegion:
    """The settings the planner may choose from. Defaults: the quality benchmark's
    validated regime (H 10-20, τ ≤ 1, every codec; P up to the model's blocks)."""

    min_inner_steps: int = 10
    max_inner_steps: int = 20
    max_sync_delay: int = 1
    max_fragments: int = 0  # 0: as many as the model has blocks
    codecs: tuple[str, ...] = DEFAULT_CODECS

    def __post_init__(self) -> None:
        if not 1 <= self.min_inner_steps <= self.max_inner_steps:
            raise ValueError(f"plan.min_inner_steps ({self.min_inner_steps}) and plan.max_inner_steps "
                             f"({self.max_inner_steps}) must satisfy 1 <= min <= max")
        if self.max_sync_delay < 0:
            raise ValueError(f"plan.max_sync_delay must be >= 0 (got {self.max_sync_delay})")
        if self.max_fragments < 0:
            raise ValueError(f"plan.max_fragments must be >= 0 (0 = the model's blocks; got {self.max_fragments})")
        if not self.codecs:
            raise ValueError("plan.codecs must name at least one codec")
        for c in self.codecs:
            if c not in ALL_CODEC_NAMES:
                raise ValueError(f"plan.codecs: unknown codec {c!r} (choose from {', '.join(ALL_CODEC_NAMES)})")

    def inner_steps_grid(self) -> list[int]:
        """H values tried: the bounds and every multiple of 5 between them."""
        lo, hi = self.min_inner_steps, self.max_inner_steps
        return sorted({lo, hi, *range(5 * math.ceil(lo / 5), hi + 1, 5)})


@dataclass
class Candidate:
    """One setting and what the simulator predicts for it."""

    mode: str
    inner_steps: int
    fragments: int
    sync_delay: int
    codec: str
    predicted_utilization: float
    bytes_per_step: float  # one worker, steady state
    peak_sync_bytes: float
    sync_wait_s: float = 0.0  # charged per sync for the slowest worker (SyncWait)
    why_not: str = ""

    @property
    def label(self) -> str:
        if self.mode == "dp":
            return "data-parallel (fp32 gradients every step)"
        return f"{self.mode} H={self.inner_steps} P={self.fragments} τ={self.sync_delay} {self.codec}"

    def algo_settings(self) -> dict:
        """The algo.* keys this candidate sets."""
        return dict(mode=self.mode, inner_steps=self.inner_steps, fragments=self.fragments,
                    sync_delay=self.sync_delay, codec=self.codec)


@dataclass
class Plan:
    chosen: Candidate
    target_utilization: float
    target_met: bool
    candidates: list[Candidate]  # every setting in the safe region, best first
    dp: Candidate
    outside: list[Candidate] = field(default_factory=list)  # a look past the safe region
    model: dict = field(default_factory=dict)
    link: dict = field(default_factory=dict)
    region: dict = field(default_factory=dict)
    tcp_slow_start: bool = True
    ranks: int = 1
    links: str = "shared"

    @property
    def dp_bytes_ratio(self) -> float:
        return self.dp.bytes_per_step / self.chosen.bytes_per_step if self.chosen.bytes_per_step else math.inf

    def to_dict(self) -> dict:
        return {
            "chosen": asdict(self.chosen), "chosen_label": self.chosen.label,
            "target_utilization": self.target_utilization, "target_met": self.target_met,
            "predicted_utilization": self.chosen.predicted_utilization,
            "predicted_dp_bytes_ratio": self.dp_bytes_ratio,
            "model": self.model, "link": self.link, "region": self.region, "tcp_slow_start": self.tcp_slow_start,
            "ranks": self.ranks, "links": self.links,
            "data_parallel": asdict(self.dp),
            "candidates": [asdict(c) for c in self.candidates],
            "outside_region": [asdict(c) for c in self.outside],
        }


@dataclass(frozen=True)
class SyncWait:
    """Seconds a worker waited on average at a meeting of all workers held every ``gap``
    steps (the probe's rehearsal); :meth:`at` scales it to another distance."""

    gap: int
    wait_s: float

    def at(self, g: float) -> float:
        return self.wait_s * math.sqrt(g / self.gap) if g > 0 else 0.0


def sync_gap(mode: str, H: int, P: int) -> float:
    """Mean inner steps between two consecutive syncs of a worker."""
    return 1.0 if mode == "dp" else H / P


def sim_bandwidth_bps(link: LinkMeasurement, links: str = "shared") -> float:
    """The bandwidth the simulator's ``bandwidth_gbps`` means (the site's link when the
    streams share it, each rank's with a link per rank), in bit/s: a link given as it is;
    a measured one was one of ``link.streams`` streams sending at once, which share a
    shared link (the site's is ``streams`` × the measured rate) and each have their own
    per rank (the measured rate)."""
    if link.given or links == "per-rank":
        return link.bandwidth_bps
    return link.bandwidth_bps * link.streams


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _simulate(model: sim.ModelSpec, link: LinkMeasurement, workers: int, mode: str, H: int, P: int, tau: int,
              codec: str, *, fragment_pattern: str, exchange: str, slow_start: bool,
              waits: SyncWait | None = None, ranks: int = 1, links: str = "shared") -> Candidate:
    cfg = sim.SimConfig(
        model=model, mode=mode, workers=workers, inner_steps=H, fragments=P if mode == "streaming" else None,
        sync_delay=tau, codec=codec, bandwidth_gbps=sim_bandwidth_bps(link, links) / 1e9, latency_s=link.rtt_s / 2,
        reductions="after-backward", fragment_pattern=fragment_pattern, exchange=exchange,
        latency_model="phases", tcp_slow_start=slow_start,
        sync_wait_s=waits.at(sync_gap(mode, H, P)) if waits else 0.0, ranks=ranks, links=links,
    )
    r = sim.simulate(cfg)
    return Candidate(mode, H, P, tau, codec, r.utilization, r.bytes_per_step, r.peak_sync_bytes, cfg.sync_wait_s)


def candidates(model: sim.ModelSpec, link: LinkMeasurement, workers: int, region: SafeRegion, *,
               fragment_pattern: str = "strided", exchange: str = "auto", slow_start: bool = True,
               waits: SyncWait | None = None, ranks: int = 1, links: str = "shared") -> list[Candidate]:
    """Every setting of the safe region, simulated."""
    max_p = region.max_fragments or model.layers
    out = []
    for codec in region.codecs:
        for H in region.inner_steps_grid():
            for P in _divisors(model.layers):
                if P > min(max_p, H):
                    continue
                for tau in range(region.max_sync_delay + 1):
                    if P > 1 or tau > 0:
                        if tau >= min_sync_gap(H, P):
                            continue
                        mode = "streaming"
                    else:
                        mode = "diloco"
                    out.append(_simulate(model, link, workers, mode, H, P, tau, codec, fragment_pattern=fragment_pattern,
                                         exchange=exchange, slow_start=slow_start, waits=waits, ranks=ranks,
                                         links=links))
    return out


def _tenths(u: float) -> int:
    """A utilization in tenths of a point (0.9712 -> 971)."""
    return round(u * 1000)


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=SAME_BYTES_RTOL)


def choose(model: sim.ModelSpec, link: LinkMeasurement, workers: int, *, target: float = 0.95,
           region: SafeRegion = SafeRegion(), fragment_pattern: str = "strided", exchange: str = "auto",
           slow_start: bool | None = None, waits: SyncWait | None = None, ranks: int = 1,
           links: str = "shared") -> Plan:
    """The plan for ``workers`` workers training ``model`` over ``link`` (module docstring);
    ``waits``: what the workers waited for each other in the probe (None: nothing);
    ``ranks``: R per worker (a site), whose streams share one link or have one each (``links``)."""
    if not 0 < target <= 1:
        raise ValueError(f"plan.target_utilization must be in (0, 1] (got {target})")
    if workers < 2:
        raise ValueError("planning a link needs at least 2 workers")
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"planning for sites needs ranks >= 1 per worker (got {ranks!r})")
    check_choice("plan.links", links, sim.LINKS)
    slow = slow_start_after_idle() if slow_start is None else slow_start
    kw = dict(fragment_pattern=fragment_pattern, exchange=exchange, slow_start=slow, waits=waits, ranks=ranks,
              links=links)
    cands = candidates(model, link, workers, region, **kw)
    ok = [c for c in cands if c.predicted_utilization >= target - 1e-12]
    bar = None
    if ok:
        chosen = min(ok, key=lambda c: (c.bytes_per_step, c.sync_delay, -c.predicted_utilization, c.fragments))
        # equal bytes compare as equal (float noise), then the tie-breaks decide
        same = [c for c in ok if _same(c.bytes_per_step, chosen.bytes_per_step)]
        chosen = min(same, key=lambda c: (c.sync_delay, -_tenths(c.predicted_utilization), c.fragments))
    else:  # the highest predicted utilization; within one point of it, the fewest bytes
        best = max(c.predicted_utilization for c in cands)
        bar = best - UNREACHED_TOLERANCE
        near = [c for c in cands if c.predicted_utilization >= bar]
        chosen = min(near, key=lambda c: (c.bytes_per_step, c.sync_delay, -c.predicted_utilization, c.fragments))
    for c in cands:
        c.why_not = "" if c is chosen else _why_not(c, chosen, target, bar)
    # the chosen first, then the others as the rule ranks them
    cut = target - 1e-12 if bar is None else bar
    cands.sort(key=lambda c: (c is not chosen, c.predicted_utilization < cut, c.bytes_per_step,
                              c.sync_delay, -c.predicted_utilization, c.fragments))
    dp = _simulate(model, link, workers, "dp", 1, 1, 0, "fp32", **kw)
    dp.why_not = f"{dp.bytes_per_step / chosen.bytes_per_step:,.0f}× the bytes" + (
        "" if dp.predicted_utilization >= target else f"; predicted {dp.predicted_utilization:.1%}")
    # a look past the region: the chosen setting at twice the largest safe H
    beyond = _simulate(model, link, workers, chosen.mode, 2 * region.max_inner_steps, chosen.fragments,
                       chosen.sync_delay, chosen.codec, **kw)
    beyond.why_not = (f"outside the safe region (H > plan.max_inner_steps = {region.max_inner_steps}): "
                      f"{chosen.bytes_per_step / beyond.bytes_per_step:.1f}× fewer bytes, quality not validated")
    return Plan(chosen, target, chosen.predicted_utilization >= target - 1e-12, cands, dp, [beyond],
                model={"name": model.name, "layers": model.layers, "params": model.params,
                       "step_time_s": model.step_time},
                link={**link.to_dict(), "sim_mbit": sim_bandwidth_bps(link, links) / 1e6},
                region={**asdict(region), "codecs": list(region.codecs)}, tcp_slow_start=slow, ranks=ranks, links=links)


def _why_not(c: Candidate, chosen: Candidate, target: float, bar: float | None) -> str:
    """Why ``c`` lost to ``chosen``; ``bar``: None when the target is reachable, else the
    utilization a setting needed to be in the running (one point below the best)."""
    if bar is None and c.predicted_utilization < target - 1e-12:
        return f"predicted {c.predicted_utilization:.1%} < target {target:.0%}"
    if bar is not None and c.predicted_utilization < bar:
        return f"predicted {c.predicted_utilization:.1%}, more than a point below the best"
    if not _same(c.bytes_per_step, chosen.bytes_per_step):
        return f"{c.bytes_per_step / chosen.bytes_per_step:.2f}× the bytes"
    if c.sync_delay != chosen.sync_delay:
        return f"same bytes, larger τ ({c.sync_delay} > {chosen.sync_delay}: overlap costs some quality)"
    if _tenths(c.predicted_utilization) != _tenths(chosen.predicted_utilization):
        return f"same bytes and τ, lower predicted utilization ({c.predicted_utilization:.1%})"
    return f"same bytes, τ and utilization (to 0.1 point), more fragments ({c.fragments} > {chosen.fragments})"


def describe(plan: Plan, show: int = 8) -> list[str]:
    """Lines for the log: the choice, then the alternatives and why they lost."""
    c = plan.chosen
    verdict = (f"reaches the target {plan.target_utilization:.0%}" if plan.target_met else
               f"MISSES the target {plan.target_utilization:.0%} (no setting in the safe region reaches it: "
               "a faster link, a larger plan.max_inner_steps or plan.max_sync_delay would)")
    lines = [
        f"chosen: {c.label}: predicted utilization {c.predicted_utilization:.1%}, {verdict}; "
        f"{c.bytes_per_step / 1e3:.3g} KB/step sent per worker, {plan.dp_bytes_ratio:,.0f}× fewer bytes than data-parallel; "
        f"{c.sync_wait_s * 1e3:.3g} ms per sync waiting for the slowest worker",
        f"alternatives ({len(plan.candidates) - 1} in the safe region; the first {min(show, len(plan.candidates) - 1)} "
        "shown, all in plan.json):",
    ]
    for a in [x for x in plan.candidates if x is not c][:show] + plan.outside + [plan.dp]:
        lines.append(f"  {a.label:<44} predicted {a.predicted_utilization:6.1%}  wait/sync {a.sync_wait_s * 1e3:5.3g} ms  "
                     f"{a.bytes_per_step / 1e3:9.3g} KB/step  {a.why_not}")
    return lines
