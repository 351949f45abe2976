"""Real slow links on one Linux machine: workers on separate emulated hosts.

`farsync wan` (root, Linux) turns one machine into M "hosts": one network namespace each,
joined by a bridge in a namespace of its own, every host's link limited in both
directions by ``tc ... tbf``. It runs one real `farsync train` worker per host
(``torch.distributed``, gloo over TCP, rendezvous at host 0) — with ``--ranks R``, R
processes per host, one site of R ranks sharing the host's link —, reads the kernel's
byte counters of every host's interface (and loopback), and reports them beside
farsync's own accounting.

    netns     namespaces, bridge, veth pairs, tbf; kernel counters; leftover cleanup
    launch    the worker processes (env:// rendezvous, PDEATHSIG, logs)
    guardian  the process that cleans up if `farsync wan` is SIGKILLed
    run       one run end to end, and the counters-vs-accounting report

What is and is not emulated: bandwidth (tbf, each direction, per host) is; latency is
not (no ``netem`` here; tbf adds queueing delay only); there is no loss beyond what a
full tbf queue would drop (reported, normally zero).
"""

from farsync.wan.netns import (
    TCP_HEADER_BYTES,
    HostCounters,
    LinkSpec,
    Network,
    WanError,
    cleanup_stale,
    list_namespaces,
    preflight,
    stale_namespaces,
)

__all__ = [
    "TCP_HEADER_BYTES", "HostCounters", "LinkSpec", "Network", "WanError", "cleanup_stale",
    "list_namespaces", "preflight", "run_wan", "stale_namespaces",
]


def run_wan(*args, **kwargs):
    """See :func:`farsync.wan.run.run_wan` (imported lazily: the guardian process imports
    this package and must start fast)."""
    from farsync.wan.run import run_wan as _run_wan

    return _run_wan(*args, **kwargs)
