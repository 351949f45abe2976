"""Measure the link between workers over the process group training will use.

Two probes, run by every worker at once (each call is collective: every member of the
group calls it with the same arguments):

* **Round trip.** Worker 0 sends one value to worker j, which sends it back; repeated,
  for every j. The median over all pairs is the round-trip time (RTT) the simulator
  charges per exchange phase.
* **Bandwidth.** Every worker sends a buffer of s bytes to every other worker at once and
  receives theirs (receives posted first, as farsync's exchanges do), so every link is
  loaded in both directions the way a sync loads it. s doubles from ``start_bytes`` until
  the exchange lasts at least ``min_seconds`` (or s reaches ``max_bytes``), each size
  repeated; a repeat's time is the slowest worker's. A straight line through
  (bytes a worker sends, median seconds) gives the rate (its slope) and the fixed cost of
  an exchange (its intercept): the rate is what one worker can send while all send,
  TCP payload bytes per second, which is what the simulator's ``bandwidth_gbps`` means.

After an idle pause one more exchange of the largest size is timed: what the first sync
after a quiet stretch pays over a warm link (TCP's window restarting from 10 segments),
reported as ``idle_extra_s``.

**Sites.** When every worker is a site of R ranks, rank r of every site probes over its own
cross-site group (the one its shards travel on), all R at once — as the R streams of a
sync load the link. The ranks of a site start every timed exchange together and stop
the size ramp together (:class:`SiteSync`), so every timed exchange has all R streams of
every site in flight: the rate measured is what *one stream* gets while the others send.
On a link the R streams share, that is 1/R of the site's link; with a link per rank,
that rank's link (``streams`` in the measurement: R).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

#: Round trips timed per peer (the first, which may set up a connection, is not counted).
PING_REPEATS = 10


@dataclass
class SizeSample:
    """Timed all-to-all exchanges of one size: seconds per repeat (the slowest worker's)."""

    bytes_per_peer: int
    bytes_sent: int  # by one worker: (M - 1) × bytes_per_peer
    seconds: list[float]

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    def rates_bps(self) -> list[float]:
        return [8 * self.bytes_sent / s for s in self.seconds if s > 0]


@dataclass
class LinkMeasurement:
    """What the probes found (all workers agree on every figure).

    bandwidth_bps: bits/s one worker sends while every worker sends to every other (fit).
    fixed_s: the fit's intercept: seconds an exchange costs beyond bytes ÷ rate.
    rtt_s: median round trip over every pair with worker 0.
    idle_extra_s: the largest exchange after an idle pause minus its warm median (≥ 0).
    """

    workers: int
    bandwidth_bps: float
    fixed_s: float
    rtt_s: float
    rtt_min_s: float
    rtt_max_s: float
    idle_extra_s: float
    probe_seconds: float
    sizes: list[SizeSample] = field(default_factory=list)
    rtt_by_peer: dict[int, list[float]] = field(default_factory=dict)
    given: bool = False  # figures from the config (plan.bandwidth_mbit / plan.rtt_ms), nothing measured
    streams: int = 1  # a worker's streams in flight at once during the probe (R of a site): the rate is one's

    @property
    def mbit(self) -> float:
        return self.bandwidth_bps / 1e6

    def spread_mbit(self) -> tuple[float, float, float]:
        """min / median / max rate of the largest size's repeats, Mbit/s."""
        if not self.sizes:
            return (self.mbit, self.mbit, self.mbit)
        r = [x / 1e6 for x in self.sizes[-1].rates_bps()]
        return (min(r), statistics.median(r), max(r))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sizes"] = [{**asdict(s), "median_s": s.median_s,
                       "mbit": [round(r / 1e6, 4) for r in s.rates_bps()]} for s in self.sizes]
        d["rtt_by_peer"] = {str(k): v for k, v in self.rtt_by_peer.items()}
        d["measured_mbit"] = self.mbit
        d["rtt_ms"] = self.rtt_s * 1e3
        lo, med, hi = self.spread_mbit()
        d["largest_size_mbit"] = {"min": lo, "median": med, "max": hi}
        return d

    def describe(self) -> str:
        if self.given:
            return (f"link given (not measured): {self.mbit:.4g} Mbit/s per worker each way, "
                    f"round trip {self.rtt_s * 1e3:.3g} ms")
        lo, _, hi = self.spread_mbit()
        big = self.sizes[-1]
        per = "per worker" if self.streams == 1 else f"per stream while each worker's {self.streams} streams send"
        return (f"link measured between {self.workers} workers in {self.probe_seconds:.1f} s: "
                f"{self.mbit:.4g} Mbit/s {per} each way (fit over {len(self.sizes)} sizes; "
                f"{lo:.4g}-{hi:.4g} Mbit/s over {len(big.seconds)} exchanges of {big.bytes_per_peer / 1e3:.0f} KB "
                f"to each peer), round trip {self.rtt_s * 1e3:.3g} ms ({self.rtt_min_s * 1e3:.3g}-"
                f"{self.rtt_max_s * 1e3:.3g}), fixed cost per exchange {self.fixed_s * 1e3:.3g} ms, "
                f"first exchange after an idle pause {self.idle_extra_s * 1e3:+.3g} ms")


def given_link(workers: int, bandwidth_mbit: float, rtt_ms: float) -> LinkMeasurement:
    """A link the user describes instead of measuring it."""
    rtt = rtt_ms / 1e3
    return LinkMeasurement(workers, bandwidth_mbit * 1e6, 0.0, rtt, rtt, rtt, 0.0, 0.0, given=True)


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys over xs; with one point, the line through
    the origin."""
    if len(xs) == 1:
        return 0.0, ys[0] / xs[0]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - slope * mx, slope


def rate_from_sizes(sizes: list[SizeSample]) -> tuple[float, float]:
    """(bits/s, fixed seconds) from timed sizes: slope and intercept of the median
    seconds over bytes sent. A slope that is not positive (noise on a fast link) falls
    back to the largest size's median rate with no fixed cost."""
    intercept, slope = fit_line([float(s.bytes_sent) for s in sizes], [s.median_s for s in sizes])
    if slope <= 0:
        big = sizes[-1]
        return 8 * big.bytes_sent / big.median_s, 0.0
    return 8 / slope, max(0.0, intercept)


def _agreed_max(t, value: float, device="cpu") -> float:
    """The largest ``value`` over the group's members (the same on every member)."""
    return max(float(x.item()) for x in t.all_gather(torch.tensor([value], dtype=torch.float64, device=device)))


def meet(t, device="cpu") -> None:
    """Return once every member has got here (give or take one crossing)."""
    t.all_gather(torch.zeros(1, dtype=torch.float64, device=device))


def gathered(t, values: list[float], device="cpu") -> list[list[float]]:
    """Every member's ``values`` (the same length on every member), by member."""
    return [x.cpu().tolist() for x in t.all_gather(torch.tensor(values, dtype=torch.float64, device=device))]


def _ping(t, peer: int, repeats: int, device) -> list[float]:
    """Round trips between member 0 and ``peer`` (member 0 times them; others return [])."""
    me, m = t.rank, t.size
    one = torch.zeros(1, dtype=torch.float64, device=device)
    nothing: list = [None] * m
    out: list[float] = []
    for i in range(repeats + 1):
        if me == 0:
            got = torch.empty(1, dtype=torch.float64, device=device)
            sends, recvs = list(nothing), list(nothing)
            sends[peer], recvs[peer] = one, got
            t0 = time.perf_counter()
            t.exchange(sends, recvs)
            if i:  # the first may include setting up the connection
                out.append(time.perf_counter() - t0)
        elif me == peer:
            got = torch.empty(1, dtype=torch.float64, device=device)
            recvs = list(nothing)
            recvs[0] = got
            t.exchange(nothing, recvs)
            sends = list(nothing)
            sends[0] = got
            t.exchange(sends, nothing)
    return out


class SiteSync:
    """The ranks of one site probing side by side, each over its own cross-site group:
    :meth:`align` returns once all of them got there, :meth:`any` is True on every rank
    when it is True on one. Over ``group`` (the site's ranks; nothing else may use it
    meanwhile: the planner runs before training)."""

    def __init__(self, group, size: int, device="cpu"):
        self.group, self.size, self.device = group, size, device

    def _max(self, value: float) -> float:
        import torch.distributed as dist

        x = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return float(x.item())

    def align(self) -> None:
        self._max(0.0)

    def any(self, flag: bool) -> bool:
        return self._max(float(flag)) > 0


def _all_to_all_seconds(t, nbytes: int, device, site: SiteSync | None = None) -> float:
    """One exchange of ``nbytes`` to and from every other member; the slowest member's time.
    ``site``: every rank of this site starts its own at the same moment."""
    me, m = t.rank, t.size
    meet(t, device)
    buf = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    recvs = [None if j == me else torch.empty(nbytes, dtype=torch.uint8, device=device) for j in range(m)]
    sends = [None if j == me else buf for j in range(m)]
    if site is not None:
        site.align()
    t0 = time.perf_counter()
    t.exchange(sends, recvs)
    if buf.device.type == "cuda":
        torch.cuda.synchronize()
    return _agreed_max(t, time.perf_counter() - t0, device)


def measure_link(t, *, min_seconds: float = 0.25, start_bytes: int = 32 * 1024, max_bytes: int = 16 * 2**20,
                 repeats: int = 3, idle_s: float = 0.5, device="cpu", site: SiteSync | None = None) -> LinkMeasurement:
    """Probe the link among the members of Transport ``t`` (see the module's docstring),
    with buffers on ``device`` (the one the exchanges use). Collective: every member calls
    it with the same arguments. ``site``: this process is one of a site's ranks, all of
    which probe at once over their own groups (every process of the run calls it)."""
    m = t.size
    if m < 2:
        raise ValueError("measuring a link needs at least 2 workers")
    t_start = time.perf_counter()
    meet(t, device)
    rtt_by_peer: dict[int, list[float]] = {}
    for peer in range(1, m):
        got = _ping(t, peer, PING_REPEATS, device)
        meet(t, device)
        rtt_by_peer[peer] = got
    # worker 0 timed the round trips: every member takes its figures
    mine = [x for p in range(1, m) for x in rtt_by_peer[p]] if t.rank == 0 else [0.0] * (PING_REPEATS * (m - 1))
    flat = gathered(t, mine, device)[0]
    rtt_by_peer = {p: flat[(p - 1) * PING_REPEATS: p * PING_REPEATS] for p in range(1, m)}

    sizes: list[SizeSample] = []
    nbytes = start_bytes
    while True:
        secs = [_all_to_all_seconds(t, nbytes, device, site) for _ in range(repeats)]
        sizes.append(SizeSample(nbytes, (m - 1) * nbytes, secs))
        done = sizes[-1].median_s >= min_seconds or nbytes * 2 > max_bytes
        if site.any(done) if site is not None else done:  # a site's streams stop together
            break
        nbytes *= 2
    bps, fixed = rate_from_sizes(sizes)
    time.sleep(idle_s)
    idle = max(0.0, _all_to_all_seconds(t, sizes[-1].bytes_per_peer, device, site) - sizes[-1].median_s)
    every = sorted(flat)
    return LinkMeasurement(
        workers=m, bandwidth_bps=bps, fixed_s=fixed, rtt_s=statistics.median(every), rtt_min_s=every[0],
        rtt_max_s=every[-1], idle_extra_s=idle, probe_seconds=_agreed_max(t, time.perf_counter() - t_start, device),
        sizes=sizes, rtt_by_peer=rtt_by_peer, streams=1 if site is None else site.size,
    )
