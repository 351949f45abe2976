"""Emulated hosts: Linux network namespaces on a private bridge, links limited by tbf.

Topology of one run (owner pid ``P``, M hosts)::

    namespace fs-P-h0            namespace fs-P-sw                namespace fs-P-h1
    eth0 10.77.0.1/24  <--veth-->  b0 ─┐                ┌─ b1  <--veth-->  eth0 10.77.0.2/24
    tbf (upload)                  tbf (download)  br0  tbf (download)       tbf (upload)

* Every interface lives inside a namespace this module creates: the veth pairs are
  created inside the switch namespace with their host end moved straight into the host's
  namespace, so nothing ever appears in (or is routed through) the caller's namespace.
  The /24 exists only on that private bridge.
* Each host's access link is limited in both directions with ``tc ... tbf``: on the
  host's own ``eth0`` (its upload) and on its switch port ``b<i>`` (its download). tbf
  counts whole Ethernet frames (``skb->len``: Ethernet + IP + TCP headers and payload).
* Latency is **not** emulated: ``netem`` is not available on these machines, and tbf
  only delays packets while they wait in its queue. The round trip is that of veth
  (tens of microseconds) plus tbf queueing; the queue is sized (``queue_ms``) so that
  TCP does not lose packets to it.
* IPv6 is switched off inside the namespaces so that router/neighbour solicitations do
  not add to the byte counters.
* TCP congestion control is set in every host namespace (``LinkSpec.congestion_control``,
  default ``reno``) instead of inheriting the machine's default. A namespace otherwise
  takes the init namespace's, which on some machines is ``bbr``; BBR sizes its window
  from the minimum RTT, which here is veth's (no latency is emulated), so when both
  directions carry a payload at once the ACKs waiting behind the peer's data stall it:
  an exchange then takes 3-18 % longer than bytes ÷ rate, differently per direction and
  per run (BENCHMARKS.md, WAN section). Reno (which is what Linux's default, CUBIC,
  behaves like at such RTTs) fills the link: within 1 %.

Namespaces are named ``fs-<owner pid>-sw`` and ``fs-<owner pid>-h<i>``; leftovers of a
run whose owner process is gone are found (and removed) by that pattern.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass

#: Namespace names this module creates and is allowed to remove.
NAME_RE = re.compile(r"^fs-(\d+)-(sw|h\d+)$")
#: The private subnet, which exists only on the bridge inside the switch namespace.
SUBNET_PREFIX = "10.77.0"
SUBNET_BITS = 24
HOST_IF = "eth0"
MAX_HOSTS = 200  # addresses .1 … .200 of the /24
#: Per-packet header bytes of a TCP/IPv4 segment as the kernel counts it on an Ethernet
#: device: Ethernet 14 + IPv4 20 + TCP 20 + timestamp option 12 (Linux's default).
#: The Ethernet preamble, FCS and inter-frame gap (24 bytes) are not in the counters.
TCP_HEADER_BYTES = 14 + 20 + 32


class WanError(RuntimeError):
    """Something the user can act on (not root, no `ip`, bad value): one line."""


def preflight() -> None:
    """Refuse early, with one line, when namespaces and tc cannot work here."""
    if not sys.platform.startswith("linux"):
        raise WanError(f"farsync wan needs Linux network namespaces (this is {sys.platform})")
    if os.geteuid() != 0:
        raise WanError("farsync wan needs root: it creates network namespaces and tc rate limits "
                       "(run it as root, e.g. with sudo)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise WanError(f"farsync wan needs the `{tool}` command (iproute2), which is not on PATH")


def _run(cmd: list[str], *, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise WanError(f"`{' '.join(cmd)}` failed: {msg[-1] if msg else f'exit code {r.returncode}'}")
    return r


@dataclass(frozen=True)
class LinkSpec:
    """One host's access link, the same in both directions.

    bandwidth_mbit: tbf rate in Mbit/s (10^6 bit/s of Ethernet frames); 0 = no limit.
    mtu: interface MTU in bytes (1500 = Ethernet; TCP then carries 1448 payload bytes per
        66 header bytes).
    burst_bytes: tbf bucket size; None = max(2 full frames, 1 ms at the rate). Small on
        purpose: each exchange starts with a full bucket, and a bucket of B bytes lets B
        bytes through at veth speed, which would make short exchanges look faster than
        the rate.
    queue_ms: tbf queue length expressed as time at the rate (tbf's ``latency``): long
        enough that TCP does not lose packets to the queue.
    congestion_control: TCP congestion control of every host namespace (its
        ``net.ipv4.tcp_congestion_control``); ``None`` keeps what the namespace inherits.
    """

    bandwidth_mbit: float
    mtu: int = 1500
    burst_bytes: int | None = None
    queue_ms: float = 2000.0
    congestion_control: str | None = "reno"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bandwidth_mbit) and self.bandwidth_mbit >= 0):
            raise WanError(f"--bandwidth {self.bandwidth_mbit}: must be Mbit/s >= 0 (0 = no limit)")
        if self.bandwidth_mbit and self.bandwidth_mbit < 0.064:
            raise WanError(f"--bandwidth {self.bandwidth_mbit}: tbf needs at least 0.064 Mbit/s (64 kbit/s)")
        if not 576 <= self.mtu <= 65535:
            raise WanError(f"--mtu {self.mtu}: must be in 576…65535 bytes")
        if self.burst_bytes is not None and self.burst_bytes < self.mtu + 14:
            raise WanError(f"--burst-bytes {self.burst_bytes}: must hold one frame (>= MTU + 14 = {self.mtu + 14})")
        if not (math.isfinite(self.queue_ms) and self.queue_ms > 0):
            raise WanError(f"--queue-ms {self.queue_ms}: must be > 0")
        if self.congestion_control is not None and not re.fullmatch(r"[a-z0-9_]+", self.congestion_control):
            raise WanError(f"--tcp-congestion {self.congestion_control!r}: not a congestion control name")

    @property
    def limited(self) -> bool:
        return self.bandwidth_mbit > 0

    @property
    def burst(self) -> int:
        if self.burst_bytes is not None:
            return self.burst_bytes
        return max(2 * (self.mtu + 14), math.ceil(self.bandwidth_mbit * 1e6 / 8 * 1e-3))

    def tbf_args(self) -> list[str]:
        kbit = max(1, round(self.bandwidth_mbit * 1000))
        return ["tbf", "rate", f"{kbit}kbit", "burst", str(self.burst), "latency", f"{self.queue_ms:g}ms"]

    @property
    def payload_fraction(self) -> float:
        """Share of the rate left for TCP payload in bulk transfer: full segments of
        MSS = MTU − 52 bytes carry 66 header bytes each (what tbf counts)."""
        mss = self.mtu - 52
        return mss / (mss + TCP_HEADER_BYTES)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["burst_bytes"] = self.burst if self.limited else None
        return d


@dataclass
class HostCounters:
    """Kernel counters of one host: its interface and its TCP stack (per namespace)."""

    tx_bytes: int = 0
    tx_packets: int = 0
    rx_bytes: int = 0
    rx_packets: int = 0
    tcp_out_segs: int = 0
    tcp_retrans_segs: int = 0
    upload_drops: int = 0  # tbf drops on the host's eth0
    download_drops: int = 0  # tbf drops on its switch port
    # the namespace's loopback: what its processes sent each other (a site's own traffic
    # when several ranks share the host; packets to the host's own address go there too)
    lo_bytes: int = 0
    lo_packets: int = 0

    def __sub__(self, other: "HostCounters") -> "HostCounters":
        return HostCounters(**{k: v - getattr(other, k) for k, v in asdict(self).items()})

    def to_dict(self) -> dict:
        return asdict(self)


class Network:
    """M emulated hosts on a private bridge. Use as a context manager, or call
    :meth:`create` and (always, in ``finally``) :meth:`teardown`."""

    def __init__(self, hosts: int, link: LinkSpec, owner_pid: int | None = None):
        if not 2 <= hosts <= MAX_HOSTS:
            raise WanError(f"--workers {hosts}: must be in 2…{MAX_HOSTS} (one emulated host per worker)")
        self.hosts = hosts
        self.link = link
        self.owner_pid = os.getpid() if owner_pid is None else owner_pid
        self.switch = f"fs-{self.owner_pid}-sw"
        self.host_names = [f"fs-{self.owner_pid}-h{i}" for i in range(hosts)]
        self.created: list[str] = []

    @property
    def names(self) -> list[str]:
        return [self.switch, *self.host_names]

    def address(self, i: int) -> str:
        return f"{SUBNET_PREFIX}.{i + 1}"

    # ---- life cycle -------------------------------------------------------------------
    def create(self) -> None:
        existing = set(list_namespaces())
        clash = [n for n in self.names if n in existing]
        if clash:
            raise WanError(f"namespace {clash[0]} already exists (a leftover run?); "
                           f"remove leftovers with: farsync wan --cleanup")
        for name in self.names:
            r = _run(["ip", "netns", "add", name], check=False)
            if r.returncode != 0:
                raise WanError(f"cannot create network namespace {name} (network namespaces unavailable?): "
                               f"{r.stderr.strip() or r.returncode}")
            self.created.append(name)
        sw = self.switch
        _run(["ip", "-n", sw, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", sw, "link", "set", "br0", "up"])
        for i, ns in enumerate(self.host_names):
            self._quiet_ipv6(ns)
            self._set_congestion_control(ns)
            port = f"b{i}"
            _run(["ip", "-n", sw, "link", "add", port, "mtu", str(self.link.mtu), "type", "veth",
                  "peer", "name", HOST_IF, "mtu", str(self.link.mtu), "netns", ns])
            _run(["ip", "-n", sw, "link", "set", port, "master", "br0"])
            _run(["ip", "-n", sw, "link", "set", port, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.address(i)}/{SUBNET_BITS}", "dev", HOST_IF])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "link", "set", HOST_IF, "up"])
            if self.link.limited:
                _run(["tc", "-n", ns, "qdisc", "add", "dev", HOST_IF, "root", *self.link.tbf_args()])
                _run(["tc", "-n", sw, "qdisc", "add", "dev", port, "root", *self.link.tbf_args()])

    @staticmethod
    def _quiet_ipv6(ns: str) -> None:
        for key in ("all", "default"):
            _run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1"], check=False)

    def _set_congestion_control(self, ns: str) -> None:
        cc = self.link.congestion_control
        if cc is None:
            return
        r = _run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv4.tcp_congestion_control={cc}"], check=False)
        if r.returncode != 0:
            allowed = _run(["ip", "netns", "exec", ns, "sysctl", "-n", "net.ipv4.tcp_allowed_congestion_control"],
                           check=False).stdout.strip()
            raise WanError(f"--tcp-congestion {cc}: cannot be set in a network namespace here "
                           f"(allowed: {allowed or 'unknown'})")

    def teardown(self) -> list[str]:
        """Kill whatever runs inside our namespaces and delete them (idempotent)."""
        return remove_namespaces(self.names)

    def __enter__(self) -> "Network":
        try:
            self.create()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    # ---- counters ---------------------------------------------------------------------
    def counters(self) -> list[HostCounters]:
        """Current kernel counters of every host (cumulative since the link was created)."""
        return [self._host_counters(i) for i in range(self.hosts)]

    def _host_counters(self, i: int) -> HostCounters:
        ns = self.host_names[i]
        link = json.loads(_run(["ip", "-n", ns, "-j", "-s", "link", "show", "dev", HOST_IF]).stdout)[0]
        st = link["stats64"]
        snmp = _tcp_snmp(_run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"]).stdout)
        c = HostCounters(
            tx_bytes=st["tx"]["bytes"], tx_packets=st["tx"]["packets"],
            rx_bytes=st["rx"]["bytes"], rx_packets=st["rx"]["packets"],
            tcp_out_segs=snmp.get("OutSegs", 0), tcp_retrans_segs=snmp.get("RetransSegs", 0),
        )
        if self.link.limited:
            c.upload_drops = _qdisc_drops(ns, HOST_IF)
            c.download_drops = _qdisc_drops(self.switch, f"b{i}")
        lo = json.loads(_run(["ip", "-n", ns, "-j", "-s", "link", "show", "dev", "lo"]).stdout)[0]["stats64"]
        c.lo_bytes, c.lo_packets = lo["tx"]["bytes"], lo["tx"]["packets"]
        return c

    def route_to_self(self, i: int) -> str:
        """How host ``i`` routes a packet to its own address (``ip route get``): the
        kernel's answer, ``local 10.77.0.1 dev lo table local ...`` — delivered over the
        loopback, never through eth0 and its tbf."""
        out = _run(["ip", "-n", self.host_names[i], "route", "get", self.address(i)]).stdout
        return " ".join(out.split())


def _tcp_snmp(text: str) -> dict[str, int]:
    """The ``Tcp:`` rows of /proc/net/snmp (a header row, then a value row)."""
    rows = [line.split()[1:] for line in text.splitlines() if line.startswith("Tcp:")]
    if len(rows) < 2:
        return {}
    return {k: int(v) for k, v in zip(rows[0], rows[1])}


def _qdisc_drops(ns: str, dev: str) -> int:
    out = json.loads(_run(["tc", "-n", ns, "-j", "-s", "qdisc", "show", "dev", dev]).stdout or "[]")
    return sum(int(q.get("drops", 0)) for q in out)


# ---- namespaces by name ----------------------------------------------------------------
def list_namespaces() -> list[str]:
    r = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def remove_namespaces(names: list[str]) -> list[str]:
    """SIGKILL the processes inside each namespace, then delete it. Only names of the
    ``fs-<pid>-…`` pattern are touched. Returns the names removed."""
    present = set(list_namespaces())
    removed = []
    for name in names:
        if not NAME_RE.match(name) or name not in present:
            continue
        pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        if _run(["ip", "netns", "del", name], check=False).returncode == 0:
            removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_namespaces() -> list[str]:
    """Our namespaces whose owner process no longer runs (leftovers of killed runs)."""
    out = []
    for name in list_namespaces():
        m = NAME_RE.match(name)
        if m and not _alive(int(m.group(1))):
            out.append(name)
    return out


def cleanup_stale() -> list[str]:
    """Remove leftovers of runs whose `farsync wan` process is gone; running ones are kept."""
    return remove_namespaces(stale_namespaces())
