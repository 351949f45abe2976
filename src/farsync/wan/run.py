"""One `farsync wan` run: hosts up, workers launched, counters read, everything removed.

Order of events::

    resolve the config (algo.workers = M, one worker per emulated host), write it to RUN/wan/recipe.toml
    build the corpus/tokenizer cache once, here, so workers only read it
    start the cleanup guardian (see farsync.wan.guardian)
    create namespaces, bridge, veths, tbf          ┐
    read kernel counters (before)                   │ try
    start M × R worker processes (R per host); wait │
    read kernel counters (after)                    ┘
    finally: stop workers, delete namespaces, release the guardian
    compare kernel counters with the run's own byte accounting -> RUN/wan.json

Cleanup is guaranteed on a normal exit, an exception, SIGINT, SIGTERM or SIGHUP (the
handlers turn the signal into an exception so the ``finally`` runs, then further
signals are ignored until cleanup is done), by ``atexit`` as a backstop, and on
SIGKILL by the guardian process. ``farsync wan --cleanup`` removes what is left if both
the run and its guardian were SIGKILLed.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager

from farsync.wan.launch import Workers, log_name
from farsync.wan.netns import TCP_HEADER_BYTES, HostCounters, LinkSpec, Network, WanError, preflight

_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: Worker processes per emulated host (``--ranks``) at most.
MAX_RANKS = 64


class Interrupted(Exception):
    """A signal stopped the run (after cleanup); ``exit_code`` is 128 + signal."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}; workers stopped and namespaces removed")


@contextmanager
def _signals_raise():
    """Turn the first SIGINT/SIGTERM/SIGHUP into :class:`Interrupted`; ignore later ones
    (they would otherwise interrupt the cleanup they asked for)."""
    fired: list[int] = []

    def handler(signum, frame):
        if fired:
            return
        fired.append(signum)
        raise Interrupted(signum)

    with _handling(handler):
        yield


@contextmanager
def _shielded():
    """Ignore SIGINT/SIGTERM/SIGHUP while cleaning up."""
    with _handling(signal.SIG_IGN):
        yield


@contextmanager
def _handling(handler):
    """Install ``handler`` for SIGINT/SIGTERM/SIGHUP; restore the old ones on exit."""
    old = {}
    try:
        for s in _SIGNALS:
            old[s] = signal.signal(s, handler)
    except ValueError:  # not the main thread: rely on the finally blocks and the guardian
        pass
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def start_guardian(names: list[str]) -> subprocess.Popen:
    """The process that cleans up if this one dies without doing so (even by SIGKILL)."""
    return subprocess.Popen(
        [sys.executable, "-m", "farsync.wan.guardian", *names], stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


def release_guardian(g: subprocess.Popen) -> None:
    try:
        g.stdin.close()  # EOF: it checks, finds nothing left, exits
        g.wait(timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        g.kill()


def resolve_config(recipe: str | None, overrides: list[str], workers: int):
    """The run's config with algo.workers = ``workers`` and a run name fixed here (so workers
    need not agree on a timestamp). Raises ConfigError (a ValueError) on bad input."""
    from farsync.overrides import parse_override
    from farsync.train.config import ConfigError, build_config, load_recipe

    for o in overrides:
        section, key, value = parse_override(o)
        if (section, key) == ("algo", "workers") and value.strip() != str(workers):
            raise ConfigError(f"--algo.workers={value} but --workers {workers}: farsync wan runs one worker per host; "
                              f"drop --algo.workers or make it {workers}")
    cfg = build_config(load_recipe(recipe) if recipe else None, [*overrides, f"--algo.workers={workers}"])
    if not cfg.train.name:
        cfg.train.name = f"wan-{cfg.algo.mode}-{cfg.algo.wire_codec}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg


def run_wan(
    recipe: str | None,
    overrides: list[str],
    *,
    workers: int,
    link: LinkSpec,
    timeout_s: float = 3600.0,
    echo: bool = True,
    log: Callable[[str], None] | None = None,
    ranks: int = 1,
) -> dict:
    """Train per recipe + overrides with one worker per emulated host — a site of
    ``ranks`` processes sharing the host's link when ``ranks`` > 1 (``site.parallel`` says
    how they train as one replica) —; return the report (also written to
    RUN_DIR/NAME/wan.json)."""
    from farsync.train.config import to_toml

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    preflight()
    net = Network(workers, link)  # validates M
    if not timeout_s > 0:
        raise WanError(f"--timeout {timeout_s}: must be > 0 seconds")
    if isinstance(ranks, bool) or not isinstance(ranks, int) or not 1 <= ranks <= MAX_RANKS:
        raise WanError(f"--ranks {ranks}: must be an integer in 1…{MAX_RANKS} (worker processes per host)")
    cfg = resolve_config(recipe, overrides, workers)
    run_path = os.path.join(cfg.train.run_dir, cfg.train.name)
    wan_dir = os.path.join(run_path, "wan")
    os.makedirs(wan_dir, exist_ok=True)
    recipe_path = os.path.join(wan_dir, "recipe.toml")
    with open(recipe_path, "w") as f:
        f.write(to_toml(cfg))
    _prebuild_data(cfg, log)

    log(f"wan: {workers} hosts ({', '.join(net.host_names)}) on a private bridge ({net.switch}), "
        + (f"{ranks} ranks each (one site of {ranks} processes sharing the host's link), " if ranks > 1 else "")
        + (f"{link.bandwidth_mbit:g} Mbit/s each way per host (tbf, burst {link.burst} B)" if link.limited
           else "no rate limit") + f", MTU {link.mtu}; latency not emulated")
    guardian = start_guardian(net.names)
    atexit.register(net.teardown)
    workers: Workers | None = None
    before = after = None
    routes: list[str] | None = None
    elapsed = 0.0
    try:
        with _signals_raise():
            try:
                net.create()
                if ranks > 1:  # how a host reaches its own address: its ranks' traffic
                    routes = [net.route_to_self(i) for i in range(net.hosts)]
                before = net.counters()
                t0 = time.perf_counter()
                workers = Workers(net, [recipe_path], wan_dir, echo=echo, ranks=ranks)
                workers.start()
                workers.wait(timeout_s)
                elapsed = time.perf_counter() - t0
                after = net.counters()
            finally:
                with _shielded():
                    if workers is not None:
                        workers.stop()
                    removed = net.teardown()
    finally:
        with _shielded():
            net.teardown()
            release_guardian(guardian)
            atexit.unregister(net.teardown)

    summary_path = os.path.join(run_path, "summary.json")
    if not os.path.exists(summary_path):
        raise WanError(f"workers finished but wrote no {summary_path} (stopped early? see "
                       f"{wan_dir}/{log_name(0, ranks)})")
    with open(summary_path) as f:
        summary = json.load(f)
    report = build_report(net, link, summary, before, after, elapsed, ranks=ranks, routes=routes)
    report["namespaces_removed"] = removed
    report["logs"] = wan_dir
    with open(os.path.join(run_path, "wan.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def _prebuild_data(cfg, log) -> None:
    """Tokenizer and token cache built once, before any worker starts, so the M workers
    read the same files instead of racing to write them."""
    from farsync.data import Corpus

    Corpus.build(cfg.data, log=log)


def build_report(net: Network, link: LinkSpec, summary: dict, before: list[HostCounters],
                 after: list[HostCounters], elapsed_s: float, *, ranks: int = 1,
                 routes: list[str] | None = None) -> dict:
    """Kernel counters beside farsync's accounting, per host.

    kernel_tx_bytes: what the host's eth0 sent, whole Ethernet frames (headers, ACKs,
        retransmissions, rendezvous and metric collectives all included).
    header_bytes: tx_packets × 66 (Ethernet 14 + IPv4 20 + TCP 32 with timestamps).
    kernel_payload_bytes: kernel_tx_bytes − header_bytes — the TCP payload the host sent.
    farsync_bytes: the run's own count for that worker (exchange payload + weight
        handshake), exact from the exchange plan. A host of R > 1 ranks is one site: its
        cross-site bytes, every rank's shard over its own stream together (the link
        carries them all); ``site_bytes`` (what stayed inside the site) are not on it.

    With R > 1 each host also has: farsync_bytes_per_stream (one rank's cross-site
    bytes), site_bytes (farsync's count of the mean shards gathered inside the site),
    kernel_lo_bytes / kernel_lo_packets (what the host's loopback carried: everything its
    ranks sent each other — DDP's or FSDP's collectives every step, the gathers, the
    site's metrics —, none of it through eth0's tbf) and own_address_route (the kernel's
    route to the host's own address: ``local ... dev lo``).
    """
    site = summary.get("site") or {}
    hosts = []
    for i in range(net.hosts):
        d = after[i] - before[i]
        acc = int(summary["bytes_sent_per_worker"][i])
        headers = d.tx_packets * TCP_HEADER_BYTES
        payload = d.tx_bytes - headers
        hosts.append({
            "host": i, "namespace": net.host_names[i], "address": net.address(i),
            "farsync_bytes": acc,
            "kernel_tx_bytes": d.tx_bytes, "kernel_tx_packets": d.tx_packets,
            "header_bytes": headers, "kernel_payload_bytes": payload,
            "payload_vs_farsync": payload / acc - 1 if acc else None,
            "wire_vs_farsync": d.tx_bytes / acc - 1 if acc else None,
            "kernel_rx_bytes": d.rx_bytes,
            "tcp_out_segs": d.tcp_out_segs, "tcp_retrans_segs": d.tcp_retrans_segs,
            "upload_drops": d.upload_drops, "download_drops": d.download_drops,
        })
        if ranks > 1:
            hosts[-1].update({
                "ranks": ranks,
                "farsync_bytes_per_stream": site["cross_site_bytes_per_stream"][i],
                "site_bytes": site["site_bytes_per_worker"][i],
                "kernel_lo_bytes": d.lo_bytes, "kernel_lo_packets": d.lo_packets,
                "own_address_route": routes[i] if routes else None,
            })
    ratios = [h["payload_vs_farsync"] for h in hosts if h["payload_vs_farsync"] is not None]
    wire = [h["wire_vs_farsync"] for h in hosts if h["wire_vs_farsync"] is not None]
    keys = ("mode", "codec", "workers", "model", "parameters", "steps", "tokens", "wall_seconds", "final_eval_loss",
            "compute_seconds", "blocked_seconds", "compute_utilization", "bytes_sent_per_worker",
            "dp_equivalent_bytes_per_worker", "sync_events", "run_dir")
    if ranks > 1:
        keys = (*keys, "site")
    report = {
        "workers": net.hosts,
        "launch": "env:// (RANK/WORLD_SIZE/MASTER_ADDR=host 0), one process per namespace, gloo over TCP" if ranks == 1
        else (f"env:// (RANK = host·{ranks} + local rank, WORLD_SIZE = hosts·{ranks}, LOCAL_RANK, LOCAL_WORLD_SIZE = "
              f"{ranks}, MASTER_ADDR = host 0), {ranks} processes per namespace (one site), gloo over TCP; "
              "a host's ranks reach each other at its own address, over its loopback"),
        "link": {**link.to_dict(), "shaping": "tbf on each host's eth0 (upload) and its switch port (download)"
                 if link.limited else "none",
                 "latency": "not emulated (no netem): veth round trip plus tbf queueing only"},
        "elapsed_seconds": elapsed_s,
        "summary": {k: summary.get(k) for k in keys},
        "per_host": hosts,
        "max_payload_disagreement": max((abs(r) for r in ratios), default=None),
        "max_wire_overhead": max(wire, default=None),
        "tcp_retrans_segs": sum(h["tcp_retrans_segs"] for h in hosts),
    }
    if ranks > 1:
        report["ranks"] = ranks
        report["parallel"] = site.get("parallel")
    return report
