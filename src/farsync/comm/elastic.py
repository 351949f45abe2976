"""Elastic runs on torchft: workers that die, hang, restart or join mid-run.

Each worker is a torchft *replica group* of one process with a stable worker id
(0..M−1); a torchft Lighthouse (``farsync lighthouse``) keeps the membership. Every
exchange is one torchft quorum:

1. ``Manager.start_quorum()`` — the Lighthouse returns the live workers (a worker is
   live while its heartbeats arrive); torchft reconfigures the gloo group among them.
   A worker whose committed-sync count is behind the others' is *healed* here: it
   receives the live peers' state over that group (:class:`farsync.comm.heal.SafeTransport`:
   tensors and JSON, never a pickle; no shared filesystem).
2. The members swap worker ids (with a secret, each proves it: :func:`farsync.comm.heal.
   prove_members`), then run the same exchange as every other backend
   (:func:`farsync.comm.distributed.run_exchange`) among themselves; results are
   reported by worker id, an absent worker as weight 0 — exactly what a run in which it
   sat the round out computes.
3. ``Manager.should_commit()`` — if any collective failed (a peer died: the connection
   closes at once; a peer hangs: gloo's timeout, ``elastic.timeout_s``), the round is
   retried with the same payload among the workers still alive: a lost worker's
   contribution to that round is dropped and the weights renormalised over the others.

A worker that starts while others are mid-run (a restart, or a new one) calls
:meth:`ElasticCommunicator.join`: it waits in a quorum until the others reach their next
sync, is healed there, takes part in that sync with weight 0 (it has trained nothing)
and continues from θ_g with everybody; the training loop gets the state as a
:class:`Rejoined`. So does a worker whose retry finds that the others committed the
round without it. What is transferred: :meth:`farsync.algorithms.diloco.DiLoCo.
shared_state` (the inner optimizer state never is).

With a secret (``elastic.secret_file`` or ``$FARSYNC_ELASTIC_SECRET``), a worker that cannot
prove it takes part in no sync and no heal: the others refuse it by name and redo the
sync without it, and it stops with an :class:`ElasticError` (so does a worker whose heal
brings a state that fails the check). Nothing is encrypted.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import torch

from farsync.codecs import get_codec
from farsync.comm import exchange as ex
from farsync.comm.base import Communicator, ExchangeRequest, ExchangeResult, FutureWork, Work
from farsync.comm.distributed import Transport, run_exchange
from farsync.comm.faults import DieAt
from farsync.comm.heal import AuthError, SafeTransport, prove_members


def replica_id(worker: int) -> str:
    """torchft's replica id of worker ``worker``: zero-padded, so that torchft's order of
    replica ids (string order) is the order of worker ids."""
    return f"farsync_{worker:05d}"


class Rejoined(Exception):
    """This worker took the live workers' state (it restarted, joined, or fell a round
    behind): ``state`` is what :meth:`~farsync.algorithms.diloco.DiLoCo.shared_state` made on a live
    peer; ``result`` the sync in progress there, in which this worker took part with
    weight 0 (None if the peers were not in a sync)."""

    def __init__(self, state: dict, result: ExchangeResult | None, *, behind: int, round: tuple | None = None):
        super().__init__(f"rejoined at step {state['step']} ({behind} syncs behind)")
        self.state, self.result, self.behind, self.round = state, result, behind, round


class ElasticError(RuntimeError):
    """This worker cannot go on with the elastic run (too few workers alive for too long,
    two workers with one id, behind the others at the end); `farsync train` prints it as
    one line."""


class NotAdmitted(ElasticError):
    """This worker failed the run's secret (it has none, or another one), or a heal
    brought it a state that failed the check: it stops at once (not retried)."""




def _torchft():
    os.environ.setdefault("RUST_LOG", "warn")  # torchft's Rust side logs every quorum at INFO
    try:
        import torchft
    except ImportError:
        raise ImportError("elastic runs need torchft: pip install 'farsync[elastic]'") from None
    return torchft


class ElasticCommunicator(Communicator):
    """Worker ``worker`` of at most ``workers``, on torchft (see the module docstring).

    Args:
        lighthouse: the Lighthouse's address (``http://host:port``).
        timeout_s: every collective's timeout (a hung peer is detected within it).
        connect_timeout_s: how long setting up a quorum's group may take (reaching the
            store it meets on, every member registering there): a member killed just
            after the quorum formed is given up on after this, not ``timeout_s``
            (measured with `farsync wan`: 300 s stalls when it was the collective
            timeout; 30 s ones at 30 s).
        quorum_timeout_s: how long a worker waits for a quorum of ``min_workers``.
        min_workers: fewer live workers than this: a round is not committed; the worker
            waits (up to ``quorum_timeout_s``) for more.
        host: this worker's address as the others reach it (its store and torchft's
            manager server); default: its hostname.
        secret: the run's shared secret (:func:`farsync.comm.heal.load_secret`): every
            member of a sync, and every heal, proves it; None: nothing is authenticated.

    A worker that can give its state to a joining peer says so with :meth:`serve`.
    """

    def __init__(self, worker: int, workers: int, *, lighthouse: str, timeout_s: float = 300.0,
                 connect_timeout_s: float = 15.0, quorum_timeout_s: float = 900.0, min_workers: int = 1,
                 host: str | None = None, secret: bytes | None = None):
        torchft = _torchft()
        from torch.distributed import TCPStore

        if not 0 <= worker < workers:
            raise ValueError(f"elastic.worker must be in [0, {workers - 1}] (got {worker})")
        self.rank, self.world_size = worker, workers
        self.timeout_s, self.quorum_timeout_s = float(timeout_s), float(quorum_timeout_s)
        self._state_fn = None
        self.min_workers = min_workers
        self._last_ids: list[int] = []
        self._die = DieAt.from_env()  # a test hook (farsync.comm.faults)
        host = host or socket.gethostname()
        logging.getLogger("torchft").setLevel(logging.ERROR)  # torchft logs every quorum at INFO, and warns of NCCL on CPU
        # a heal's refusal is said in one line by this worker (or becomes a retry), not as torchft's traceback
        logging.getLogger("torchft.manager").addFilter(_not_a_refusal)
        # torchft's manager meets the other replica groups through a store of its own group's
        self._store = TCPStore(host, 0, is_master=True, wait_for_workers=False)
        timeout = timedelta(seconds=self.timeout_s)
        # the group's own timeout bounds its set-up in every quorum; every message waits
        # elastic.timeout_s (_Timed)
        self._connect = timedelta(seconds=min(self.timeout_s, connect_timeout_s))
        self._pg = torchft.ProcessGroupGloo(timeout=self._connect)
        self._secret = secret
        self._heal = SafeTransport(self._pg, timeout, worker, secret)  # tensors and JSON only, never a pickle
        try:
            self.manager = torchft.Manager(
                pg=self._pg, load_state_dict=self._load, state_dict=self._save, min_replica_size=min_workers,
                use_async_quorum=False, timeout=timeout, quorum_timeout=timedelta(seconds=self.quorum_timeout_s),
                connect_timeout=self._connect, rank=0, world_size=1, store_addr=host, store_port=self._store.port,
                lighthouse_addr=lighthouse, replica_id=replica_id(worker), hostname=host, init_sync=False,
                checkpoint_transport=self._heal,
            )
        except RuntimeError as e:  # torchft: the lighthouse does not answer within connect_timeout_s
            raise ElasticError(f"cannot reach the lighthouse at {lighthouse} (elastic.lighthouse): {_short(e)}") from None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="farsync-elastic")
        self._buffers = ex.DecodeBuffers()
        self._current: dict | None = None  # the exchange in progress, for a joining peer
        self._loaded: dict | None = None  # the state a heal brought
        self._members: tuple[int, ...] | None = None  # worker ids of the last committed sync
        #: membership changes, retries and heals, in order: dicts with "event", "time", ...
        self.events: list[dict] = []

    @property
    def authenticated(self) -> bool:
        """Whether every sync and heal of this worker proves the run's secret."""
        return self._secret is not None

    def serve(self, state_fn) -> None:
        """Give joining peers ``state_fn()``: what they need to continue with this
        worker's θ_g (called on the exchange thread while the training loop waits for the
        exchange; must return copies)."""
        self._state_fn = state_fn

    # ---- the exchange ---------------------------------------------------------------
    def exchange(self, request: ExchangeRequest) -> Work:
        ex.validate_weight(request.weight)
        # kept whole to retry it: a private copy of the buffer
        call = dataclasses.replace(request, buf=request.buf.detach().clone(), weight=float(request.weight))
        plan = ex.make_plan(call.buf.numel(), self.world_size, call.codec, call.method)  # the full group's, for the estimate
        return FutureWork(self._executor.submit(self._run, call), plan.bytes_sent)  # wait() raises Rejoined

    def _run(self, call: ExchangeRequest) -> ExchangeResult:
        """Quorum, exchange, commit; again among the survivors until a round commits."""
        # what a joining peer needs to take part in this sync (plain data)
        c = call.codec
        self._current = {"round": call.round, "numel": call.buf.numel(), "method": call.method,
                         "codec": {"name": c.name, "block_size": getattr(c, "block_size", None),
                                   "stochastic_rounding": c.stochastic_rounding},
                         "aggregation": dataclasses.asdict(call.aggregation)}
        deadline = time.monotonic() + self.quorum_timeout_s
        try:
            while True:
                t0 = time.time()
                res, why = None, ""
                try:
                    healed = self._quorum()
                    if healed is not None:
                        raise healed
                    res = self._exchange_once(call)
                except (Rejoined, NotAdmitted):
                    raise
                except Exception as e:  # a peer died or hung mid-round, or was refused (AuthError)
                    self.manager.report_error(e)
                    why = _short(e)
                if self.manager.should_commit() and res is not None:
                    self._note_members(t0, call.round)
                    return res
                few = not why
                why = why or f"only {self.manager.num_participants()} workers alive, fewer than elastic.min_workers"
                if not (few and self.events and self.events[-1].get("why") == why):  # one line per wait
                    self.events.append({"event": "retry", "time": time.time(), "failed_at": t0,
                                        "round": _tag(call.round), "why": why})
                if few:
                    time.sleep(0.5)  # wait for workers to (re)join
                if time.monotonic() > deadline:
                    raise ElasticError(f"no sync among at least {self.min_workers} workers for "
                                       f"{self.quorum_timeout_s:.0f} s (elastic.quorum_timeout_s); last error: {why}")
        finally:
            self._current = None

    def _quorum(self) -> Rejoined | None:
        """Start a quorum; if this worker was healed in it, take part in the peers' sync
        with weight 0 (again in new quorums while that sync fails; a new heal, if the
        peers moved on meanwhile, replaces the state) and return the :class:`Rejoined`
        to raise."""
        before = self.manager.current_step()
        self._start_quorum()
        if self._loaded is None:
            return None
        deadline = time.monotonic() + self.quorum_timeout_s
        state = None
        while True:
            if self._loaded is not None:
                state, self._loaded = self._loaded, None
            e, result = state["exchange"], None
            try:
                if e is not None:  # the sync the peers are in: ours too, with nothing to add
                    result = self._exchange_once(_joining_call(e))
            except NotAdmitted:
                raise
            except Exception as err:  # a peer failed: they retry this sync, or commit it and move on
                self.manager.report_error(err)
            if self.manager.should_commit():
                break
            if time.monotonic() > deadline:
                raise ElasticError(f"could not join the others' sync for {self.quorum_timeout_s:.0f} s "
                                   "(elastic.quorum_timeout_s)")
            self._start_quorum()
        behind = self.manager.current_step() - before
        self._note_members(time.time(), e["round"] if e else None)
        self.events.append({"event": "healed", "time": time.time(), "step": state["farsync"]["step"], "behind": behind})
        return Rejoined(state["farsync"], result, behind=behind, round=tuple(e["round"]) if e else None)

    def _start_quorum(self) -> None:
        """``Manager.start_quorum``, then what the heal refused there (torchft swallows
        it): an ElasticError if this worker cannot go on, else the AuthError to fail this
        quorum with (the others redo the sync without the refused peer)."""
        self.manager.start_quorum()
        refused = self._heal.take_refusal()
        if refused is not None:
            if refused.fatal:
                raise NotAdmitted(str(refused))
            raise refused

    def _exchange_once(self, call: ExchangeRequest) -> ExchangeResult:
        """One exchange among this quorum's members, each having proved the secret; the
        result by worker id."""
        n, me = self.manager.num_participants(), self.manager.participating_rank()
        if me is None:
            raise ElasticError("this worker is not a participant of the quorum")
        t = Transport(me, n, self._post)
        try:
            ids = prove_members(t, self.rank, call.round, self.manager.current_step(), self._secret)
        except AuthError as e:
            if e.fatal:
                raise NotAdmitted(str(e)) from None
            raise
        if sorted(ids) != ids or len(set(ids)) != n:
            raise ElasticError(f"quorum members {ids}: two workers run with the same elastic.worker")
        self._last_ids = ids
        if self._die is not None:
            self._die.in_sync(call.round, call.weight)  # test hook: lost or hung mid-sync
        plan = ex.make_plan(call.buf.numel(), n, call.codec, call.method)
        res = run_exchange(t, plan, call.codec, ex.pad(plan, call.buf), call.weight, call.generator, call.aggregation,
                           self._buffers, call.round)
        return _by_worker(res, ids, self.world_size)

    def _post(self, sends, recvs):
        """Transport.post over torchft's group (ranks: this quorum's)."""
        pg, timeout = self._pg, timedelta(seconds=self.timeout_s)
        works = [pg.recv([t], j, 0) for j, t in enumerate(recvs) if t is not None]
        works += [pg.send([t], j, 0) for j, t in enumerate(sends) if t is not None]
        return [_Timed(w, timeout) for w in works]

    def _note_members(self, t0: float, round) -> None:
        members = tuple(self._last_ids)
        if self._members is not None and members != self._members:
            self.events.append({"event": "members", "time": time.time(), "since": t0, "round": _tag(round),
                                "lost": sorted(set(self._members) - set(members)),
                                "joined": sorted(set(members) - set(self._members)), "workers": list(members)})
        self._members = members

    # ---- joining --------------------------------------------------------------------
    def join(self, want: int, wait_s: float, *, step: int = 0) -> Rejoined | None:
        """At start-up: a quorum with the live workers. If they are mid-run, this worker
        is healed there and gets a :class:`Rejoined`; if all start together (at schedule
        step ``step``: 0, or a common checkpoint's), they wait up to ``wait_s`` for
        ``want`` workers and return None.

        Heals go to whoever has committed fewer syncs (torchft's step). A starting
        process has committed none, and commits its first only with the quorum that
        starts training together (all members decide alike: they swap their verdicts),
        so a worker that starts while others train is always behind them — healed,
        whatever checkpoint it resumed from — and a quorum without a heal holds starting
        workers only."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                healed = self._quorum()
            except AuthError as e:  # this quorum refused a peer's heal: a new one, without it
                self.manager.report_error(e)
                self.manager.should_commit()
                self.events.append({"event": "retry", "time": time.time(), "failed_at": time.time(), "round": None,
                                    "why": _short(e)})
                time.sleep(0.2)
                continue
            if healed is not None:
                return healed
            n, me = self.manager.num_participants(), self.manager.participating_rank()
            mine = n >= want or time.monotonic() > deadline
            votes = [(int(mine), step)]
            if n > 1:
                try:
                    got = Transport(me, n, self._post).all_gather(torch.tensor([int(mine), step], dtype=torch.int64))
                    votes = [(int(x[0]), int(x[1])) for x in got]
                except Exception as e:  # a peer left: try again
                    self.manager.report_error(e)
                    votes = [(0, step)]
            if any(v for v, _ in votes) and self.manager.should_commit():
                steps = sorted({s for _, s in votes})
                if len(steps) > 1:
                    raise ElasticError(f"the workers start from different steps {steps} (checkpoints of different "
                                       "steps): restart them from one step")
                return None
            time.sleep(0.2)

    def _save(self) -> dict:
        """What a healed peer receives: the loop's state and the exchange in progress."""
        if self._state_fn is None:
            raise ElasticError("no state to give a joining worker (ElasticCommunicator.serve was not called)")
        return {"farsync": self._state_fn(), "exchange": self._current}

    def _load(self, state: dict) -> None:
        self._loaded = state

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
            self.manager.shutdown(wait=False)


def _not_a_refusal(record: logging.LogRecord) -> bool:
    """A logging filter: False for torchft's log of a heal farsync refused (AuthError)."""
    return not (record.exc_info and isinstance(record.exc_info[1], AuthError))


class _Timed:
    """A message's handle whose wait() gives up after elastic.timeout_s (the group's
    own timeout is the shorter set-up one)."""

    def __init__(self, work, timeout: timedelta):
        self.work, self.timeout = work, timeout

    def wait(self):
        return self.work.wait(self.timeout)


def _joining_call(e: dict) -> ExchangeRequest:
    """A joining worker's part in the peers' sync ``e`` (what :meth:`ElasticCommunicator._run`
    records): the same codec, method and aggregation, with nothing to add."""
    c = e["codec"]
    codec = get_codec(c["name"], block_size=c["block_size"], stochastic_rounding=c["stochastic_rounding"])
    return ExchangeRequest(torch.zeros(e["numel"]), codec, 0.0, None, e["method"], round=tuple(e["round"]),
                           aggregation=ex.Aggregation(**e["aggregation"]))


def _by_worker(res: ExchangeResult, ids: list[int], workers: int) -> ExchangeResult:
    """``res`` (by member) with every rank a worker id and absent workers at weight 0."""
    weights = [0.0] * workers
    for j, w in zip(ids, res.weights):
        weights[j] = w
    kept = None if res.kept is None else tuple(ids[r] for r in res.kept)
    excluded = tuple((ids[r], why) for r, why in res.excluded)
    return ExchangeResult(res.mean, tuple(weights), res.bytes_sent, res.control_bytes + 8 * (len(ids) - 1),
                          kept, excluded, res.skipped)


def _tag(round) -> list | None:
    return None if round is None else list(round)


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def lighthouse_address(configured: str) -> str:
    """``elastic.lighthouse``, else ``TORCHFT_LIGHTHOUSE``; ValueError if neither."""
    addr = configured or os.environ.get("TORCHFT_LIGHTHOUSE", "")
    if not addr:
        raise ValueError("elastic runs need a lighthouse: set elastic.lighthouse=http://HOST:PORT "
                         "(or TORCHFT_LIGHTHOUSE); start one with `farsync lighthouse`")
    return addr
