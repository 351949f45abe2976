"""Real worker processes: R per emulated host (``--ranks``; 1 by default).

Each process is ``ip netns exec fs-P-h<i> python -m farsync train RECIPE`` with the
environment ``torchrun --nnodes=hosts --nproc-per-node=R`` would give it (``RANK`` =
host·R + local, ``WORLD_SIZE`` = hosts·R, ``LOCAL_RANK`` = local, ``LOCAL_WORLD_SIZE`` =
R, ``MASTER_ADDR``/``MASTER_PORT`` = host 0's address on the private bridge), so
:func:`farsync.comm.rendezvous.join` initialises gloo through ``env://`` (with R > 1 the
host is one site of R ranks) and the rendezvous store runs in rank 0, on host 0.
``GLOO_SOCKET_IFNAME=eth0`` makes gloo use the host's rate-limited interface rather than
whatever its hostname resolves to. The R ranks of one host share that interface's
address; what one sends another goes to a local address, which the kernel delivers over
the namespace's loopback (``lo``), never through eth0's tbf: a site's own traffic (DDP's
gradients, FSDP's gathers, the mean shards gathered back) stays off the link.

Why not ``torchrun`` itself: per host it would add an agent process and its own
rendezvous traffic to the byte counters, and a layer between us and the worker's pid;
the plain environment is the same contract (``env://``) with nothing in between.

Every worker runs in a session of its own (so a terminal Ctrl-C reaches only
`farsync wan`, which then stops the workers in order) and with ``PR_SET_PDEATHSIG`` =
SIGKILL, so the kernel kills it if `farsync wan` dies without cleaning up.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO

from farsync.wan.netns import HOST_IF, Network, WanError

MASTER_PORT = 29500
_PR_SET_PDEATHSIG = 1
# Variables of an enclosing torchrun that must not leak into our workers.
_DROP_ENV_PREFIXES = ("TORCHELASTIC_", "GROUP_", "ROLE_", "TORCH_NCCL_")


class WorkerFailed(WanError):
    """A worker exited with an error; the message carries the tail of its log."""


def _pdeathsig_preexec():
    """preexec_fn: ask the kernel to SIGKILL the child when this process dies."""
    parent = os.getpid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # loaded here, before fork
        prctl = libc.prctl
    except (OSError, AttributeError):
        prctl = None

    def preexec() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def worker_env(net: Network, rank: int, port: int = MASTER_PORT, ranks: int = 1) -> dict[str, str]:
    """The environment of global rank ``rank`` (host ``rank // ranks``, local rank
    ``rank % ranks``)."""
    host, local = divmod(rank, ranks)
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROP_ENV_PREFIXES)}
    env.update(
        RANK=str(rank), WORLD_SIZE=str(net.hosts * ranks), LOCAL_RANK=str(local), LOCAL_WORLD_SIZE=str(ranks),
        MASTER_ADDR=net.address(0), MASTER_PORT=str(port), GLOO_SOCKET_IFNAME=HOST_IF,
        PYTHONUNBUFFERED="1", FARSYNC_WAN_HOST=net.host_names[host],
    )
    return env


def worker_command(net: Network, rank: int, train_args: list[str], ranks: int = 1) -> list[str]:
    return ["ip", "netns", "exec", net.host_names[rank // ranks], sys.executable, "-m", "farsync", "train",
            *train_args]


def log_name(rank: int, ranks: int = 1) -> str:
    """``host<i>.log`` (one rank per host), ``host<i>.r<local>.log`` (R per host)."""
    host, local = divmod(rank, ranks)
    return f"host{host}.log" if ranks == 1 else f"host{host}.r{local}.log"


@dataclass
class _Proc:
    rank: int
    popen: subprocess.Popen
    log_path: str


class Workers:
    """Start, supervise and stop the M × R worker processes (R = ``ranks`` per host).

    Logs go to ``log_dir/host<i>.log`` (``host<i>.r<local>.log`` with R > 1); with ``echo``
    rank 0's output is also copied to ``echo_to`` (stderr) as it comes, so the user sees
    the usual training progress.
    """

    def __init__(self, net: Network, train_args: list[str], log_dir: str, *, echo: bool = True,
                 echo_to: IO[str] | None = None, port: int = MASTER_PORT, ranks: int = 1):
        self.net = net
        self.ranks = ranks
        self.train_args = train_args
        self.log_dir = log_dir
        self.echo = echo
        self.echo_to = echo_to or sys.stderr
        self.port = port
        self.procs: list[_Proc] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        preexec = _pdeathsig_preexec()
        for rank in range(self.net.hosts * self.ranks):
            path = os.path.join(self.log_dir, log_name(rank, self.ranks))
            log = open(path, "wb")
            pipe = self.echo and rank == 0
            try:
                p = subprocess.Popen(
                    worker_command(self.net, rank, self.train_args, self.ranks),
                    env=worker_env(self.net, rank, self.port, self.ranks),
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if pipe else log, stderr=subprocess.STDOUT,
                    start_new_session=True, preexec_fn=preexec,
                )
            except BaseException:
                log.close()
                raise
            self.procs.append(_Proc(rank, p, path))
            if pipe:
                t = threading.Thread(target=self._tee, args=(p.stdout, log), daemon=True)
                t.start()
                self._threads.append(t)
            else:
                log.close()  # the child holds its own copy

    def _tee(self, src, log) -> None:
        try:
            while True:
                chunk = src.read1(4096) if hasattr(src, "read1") else src.read(4096)
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                try:
                    self.echo_to.write(chunk.decode(errors="replace"))
                    self.echo_to.flush()
                except (OSError, ValueError):
                    pass
        finally:
            log.close()

    def wait(self, timeout_s: float) -> None:
        """Return when every worker exited 0; on a failure or the timeout, stop them all
        and raise with the failing worker's log tail."""
        deadline = time.monotonic() + timeout_s
        while True:
            codes = [p.popen.poll() for p in self.procs]
            bad = [(p, c) for p, c in zip(self.procs, codes) if c not in (None, 0)]
            if bad:
                # the first to fail is the cause; the others usually fail because of it
                p, code = bad[0]
                self.stop()
                who = f"worker {p.rank}" if self.ranks == 1 else f"rank {p.rank} (local rank {p.rank % self.ranks})"
                raise WorkerFailed(f"{who} on {self.net.host_names[p.rank // self.ranks]} exited with code {code}; "
                                   f"log {p.log_path}:\n{tail(p.log_path)}")
            if all(c == 0 for c in codes):
                self._join()
                return
            if time.monotonic() > deadline:
                self.stop()
                raise WanError(f"workers did not finish within --timeout {timeout_s:g} s; stopped them "
                               f"(logs in {self.log_dir})")
            time.sleep(0.1)

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM every worker still running, SIGKILL after ``grace_s``. Idempotent."""
        running = [p for p in self.procs if p.popen.poll() is None]
        for p in running:
            _signal_group(p.popen, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in running:
            try:
                p.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p.popen, signal.SIGKILL)
                p.popen.wait()
        self._join()

    def _join(self) -> None:
        for t in self._threads:
            t.join(timeout=5)


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)  # its own session: the group is the worker and its children
    except (ProcessLookupError, PermissionError):
        try:
            p.send_signal(sig)
        except ProcessLookupError:
            pass


def tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, "rb") as f:
            text = f.read()[-20000:].decode(errors="replace")
    except OSError:
        return "(no log)"
    text = text.replace("\r", "\n")
    return "\n".join(line for line in text.splitlines()[-lines:])
