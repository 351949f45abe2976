"""What every training method shares: the phases of a step, the exchange seam, the
blocked-time clock, the events a driver logs, and checkpoint state.

A :class:`Strategy` wraps one worker's model and *unchanged* inner optimizer. A training
step is four phases, which :meth:`Strategy.step` runs in order; a driver that simulates
M workers in one thread runs each phase for every worker before the next
(:func:`step_in_lockstep`), so every exchange has all M contributions before anyone
waits on it:

1. :meth:`~Strategy.launch` — start this step's exchange, if the method has one
   before the inner step (data-parallel: the gradient mean).
2. :meth:`~Strategy.wait` — wait for it and apply it (data-parallel: write the mean
   into ``p.grad``). ``sync_gradients()`` = 1 + 2; clip gradients after it if you clip.
3. :meth:`~Strategy.inner_step` — the inner optimizer's step; then start the exchanges
   due after it (DiLoCo: the fragments' pseudo-gradients).
4. :meth:`~Strategy.complete` — land the exchanges due now (DiLoCo: outer step + merge).

Everything a driver asks of a strategy is declared here, with a default: the schedule
(:meth:`~Strategy.due_to_send`), progress (``step_count``, ``steps_trained``), what
happened (:meth:`~Strategy.drain_events`, ``exclusions``, ``skipped_rounds``), state
(:meth:`~Strategy.state_dict`) and, for methods with rounds, what a joining worker needs
(:meth:`~Strategy.shared_state`, :meth:`~Strategy.adopt`).

Time: the strategy adds the time it is blocked on an exchange to
``stats.blocked_seconds``; the driver, which alone knows where one worker's compute
starts and stops, adds compute time with ``stats.add_compute`` (see
:mod:`farsync.train.loop`).

The methods are :class:`~farsync.algorithms.dp.DataParallel` and
:class:`~farsync.algorithms.diloco.DiLoCo` (DiLoCo and Streaming DiLoCo);
:func:`farsync.algorithms.make_strategy` picks one by ``mode``.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable

import torch
from torch import nn

from farsync.algorithms.accounting import CommStats
from farsync.comm.base import Communicator, ExchangeRequest, ExchangeResult, Work
from farsync.comm.exchange import PLAIN, Aggregation
from farsync.schedule import EXCHANGES, SettingError, check_choice

#: Version of :meth:`Strategy.state_dict`'s layout.
STATE_FORMAT = 1


class Strategy(abc.ABC):
    """One worker's side of a training method (see the module docstring).

    Args:
        model: any ``nn.Module``.
        inner_optimizer: any ``torch.optim.Optimizer`` over all of the model's trainable
            parameters; used unchanged, its state never leaves the worker.
        comm: this worker's :class:`~farsync.comm.Communicator`.
        exchange: ``"auto"``, ``"reduce-scatter"`` or ``"all-gather"``
            (see :mod:`farsync.comm.exchange`).
        workers: expected M; a communicator of another size is an error.
    """

    #: ``"dp"``, ``"diloco"`` or ``"streaming"`` (:data:`farsync.schedule.MODES`)
    mode: str

    def __init__(
        self,
        model: nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        comm: Communicator,
        *,
        exchange: str = "auto",
        workers: int | None = None,
    ):
        if workers is not None and workers != comm.world_size:
            raise SettingError(
                "workers", workers,
                f"does not match the communicator's {comm.world_size} workers; launch {workers} or set workers={comm.world_size}",
            )
        check_choice("exchange", exchange, EXCHANGES)
        self.model = model
        self.inner_optimizer = inner_optimizer
        self.comm = comm
        self.exchange = exchange
        self.params = [p for p in model.parameters() if p.requires_grad]
        owned = {id(p) for g in inner_optimizer.param_groups for p in g["params"]}
        stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owned]
        if stray:
            raise ValueError(f"inner_optimizer does not update parameter '{stray[0]}' of the model; pass all model parameters to it")
        self.step_count = 0  # schedule steps completed (trained or sat out)
        self.stats = CommStats(comm.world_size, sum(p.numel() for p in self.params))
        #: contributions left out, as every worker saw them: worker, fragment, round, step, why
        self.exclusions: list[dict] = []
        #: rounds skipped for want of contributions: fragment, round, step, kept
        self.skipped_rounds: list[dict] = []
        self._events: list[dict] = []  # since the last drain_events()

    # ---- phases ---------------------------------------------------------------------
    def launch(self) -> None:
        """Phase 1: start the exchange needed before the inner step (none by default)."""

    def wait(self) -> None:
        """Phase 2: wait for phase 1's exchange and apply it (nothing by default)."""

    @abc.abstractmethod
    def inner_step(self, tokens: int | None = None) -> None:
        """Phase 3: the inner optimizer's step on ``tokens`` tokens (None: count the step
        as 1), then start the exchanges due after it."""

    def idle_step(self) -> None:
        """Phase 3 for a worker that trained nothing this step (slower than the
        schedule): the schedule advances, exchanges due start, nothing is trained."""
        raise NotImplementedError(f"{self.mode}: every worker trains every step (no idle steps)")

    def complete(self) -> None:
        """Phase 4: land the exchanges due now (nothing by default)."""

    def sync_gradients(self) -> None:
        """Phases 1 and 2: call before clipping gradients (a no-op where gradients are
        not exchanged)."""
        self.launch()
        self.wait()

    def step(self, tokens: int | None = None) -> None:
        """One full training step for this worker: phases 1–4."""
        self.sync_gradients()
        self.inner_step(tokens)
        self.complete()

    def idle(self) -> None:
        """A schedule step this worker sits out (no forward, backward or optimizer
        step): :meth:`idle_step`, then phase 4."""
        self.idle_step()
        self.complete()

    def launch_final(self) -> None:
        """End of training, phase 1: start the exchanges that bring θ_g up to date (none
        by default). :meth:`finish` calls it if the driver has not."""

    def finish(self) -> None:
        """Land whatever is still in flight (call once, at the end of training)."""

    # ---- schedule and progress ------------------------------------------------------
    def due_to_send(self, step: int) -> list[int]:
        """What starts its exchange after schedule step ``step`` (fragment indices; none
        by default: a method without rounds, whose exchange is every step's)."""
        return []

    @property
    def steps_trained(self) -> int:
        """Inner optimizer steps taken (``step_count`` counts the steps sat out too)."""
        return self.stats.inner_steps

    @property
    def in_flight(self) -> list[int]:
        """Exchanges started and not yet landed (fragment indices for DiLoCo)."""
        return []

    @torch.no_grad()
    def global_parameters(self) -> dict[str, torch.Tensor]:
        """θ_g by parameter name: the model to evaluate (the worker's own by default;
        sharded parameters gathered whole)."""
        from farsync.algorithms.fragments import full

        return {n: full(p.detach()) for n, p in self.model.named_parameters()}

    # ---- what happened ----------------------------------------------------------------
    def drain_events(self) -> list[dict]:
        """What happened since the last call, in order, as every worker saw it: a dict per
        event, ``kind`` one of ``sync`` (a sync landed: fragment, round, step, kept,
        sat_out, excluded, skipped), ``excluded`` (a contribution left out: worker,
        fragment, round, step, why) and ``skipped`` (a round without enough
        contributions: fragment, round, step, kept). ``exclusions`` and
        ``skipped_rounds`` keep the whole run's record of the last two."""
        out, self._events = self._events, []
        return out

    def _note(self, kind: str, event: dict) -> None:
        self._events.append({"kind": kind, **event})
        if kind == "excluded":
            self.exclusions.append(event)
        elif kind == "skipped":
            self.skipped_rounds.append(event)

    # ---- the seam ---------------------------------------------------------------------
    def _start(self, buf: torch.Tensor, codec, *, round: tuple, generator: torch.Generator | None = None,
               weight: float = 1.0, aggregation: Aggregation = PLAIN) -> Work:
        """Start an exchange of ``buf`` with this worker's ``weight``. Where the receivers
        do not check finiteness themselves (``aggregation``), a non-finite buffer is
        flagged (NaN weight) so every worker learns of it in the same exchange."""
        if not aggregation.check_finite and weight > 0 and not bool(torch.isfinite(buf).all()):
            weight = float("nan")
        return self.comm.exchange(ExchangeRequest(buf, codec, weight, generator, self.exchange, round=round,
                                                  aggregation=aggregation))

    def _wait(self, work: Work) -> ExchangeResult:
        """Wait for ``work``, adding the time blocked to ``stats.blocked_seconds``."""
        t0 = time.perf_counter()
        res = work.wait()
        self.stats.blocked_seconds += time.perf_counter() - t0
        return res

    # ---- state ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume exactly (with the model's and inner optimizer's
        own state dicts)."""
        return {"format": STATE_FORMAT, "mode": self.mode, "step": self.step_count, "stats": self.stats.to_dict(),
                "exclusions": list(self.exclusions), "skipped_rounds": list(self.skipped_rounds)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(f"checkpoint is for mode {state.get('mode')!r}, this run is {self.mode!r}")
        if self.in_flight:
            raise RuntimeError("load_state_dict while exchanges are in flight")
        self.step_count = int(state["step"])
        self.stats.load_dict(state["stats"])
        self.exclusions = list(state.get("exclusions", []))
        self.skipped_rounds = list(state.get("skipped_rounds", []))

    def shared_state(self) -> dict:
        """What every worker holds alike, for a worker that joins mid-run (elastic runs)."""
        raise NotImplementedError(f"{self.mode}: a worker cannot join mid-run (it needs rounds: diloco or streaming)")

    def adopt(self, state: dict, landing=None) -> None:
        """Continue from a live worker's :meth:`shared_state` (elastic runs)."""
        raise NotImplementedError(f"{self.mode}: a worker cannot join mid-run (it needs rounds: diloco or streaming)")


def finish_in_lockstep(strategies: list[Strategy]) -> None:
    """End training for several simulated workers in one thread: every worker starts its
    final exchanges before any worker waits for them."""
    for s in strategies:
        s.launch_final()
    for s in strategies:
        s.finish()


def step_in_lockstep(
    strategies: list[Strategy], before_inner_step: Callable[[Strategy], None] | None = None,
    tokens: list[int] | None = None, active: list[bool] | None = None,
) -> None:
    """Run one training step's phases for several simulated workers in one thread.

    Call after every worker's backward pass. Each phase runs for all workers before the
    next, so every exchange has all M contributions before anyone waits on it — the
    in-process analogue of ranks meeting in a collective. ``before_inner_step`` runs
    per worker between the gradient mean and the inner step (gradient clipping).
    ``tokens`` are what each worker trained on; a worker not ``active`` takes an idle
    step instead (it trained nothing: a slower worker's step that the schedule skips).
    """
    active = active or [True] * len(strategies)
    for s, a in zip(strategies, active):
        if a:
            s.launch()
    for s, a in zip(strategies, active):
        if a:
            s.wait()
            if before_inner_step is not None:
                before_inner_step(s)
    for i, (s, a) in enumerate(zip(strategies, active)):
        if a:
            s.inner_step() if tokens is None else s.inner_step(tokens[i])
        else:
            s.idle_step()
    for s in strategies:
        s.complete()
