"""What every training method shares: the phases of a step, the exchange seam, the
blocked-time clock, and checkpoint state.

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

Time: the strategy adds the time it is blocked on an exchange to
``stats.blocked_seconds``; the driver, which alone knows where one worker's compute
starts and stops, adds compute time with ``stats.add_compute`` (see
:mod:`farsync.train.loop`).

Two strategies: :class:`~farsync.algorithms.dp.DataParallel` and
:class:`~farsync.algorithms.diloco.DiLoCo` (DiLoCo and Streaming DiLoCo);
:func:`make_strategy` picks one by ``mode``.
"""

from __future__ import annotations

import abc
import inspect
import time
from collections.abc import Callable

import torch
from torch import nn

from farsync.algorithms.accounting import CommStats
from farsync.comm.base import Communicator, ExchangeRequest, ExchangeResult, Work
from farsync.comm.exchange import PLAIN, Aggregation
from farsync.schedule import EXCHANGES, MODES, SettingError, check_choice

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
        self.step_count = 0  # inner steps completed
        self.stats = CommStats(comm.world_size, sum(p.numel() for p in self.params))

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

    @property
    def in_flight(self) -> list[int]:
        """Exchanges started and not yet landed (fragment indices for DiLoCo)."""
        return []

    @torch.no_grad()
    def global_parameters(self) -> dict[str, torch.Tensor]:
        """θ_g by parameter name: the model to evaluate (the worker's own by default)."""
        return {n: p.detach() for n, p in self.model.named_parameters()}

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
        return {"format": STATE_FORMAT, "mode": self.mode, "step": self.step_count, "stats": self.stats.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(f"checkpoint is for mode {state.get('mode')!r}, this run is {self.mode!r}")
        if self.in_flight:
            raise RuntimeError("load_state_dict while exchanges are in flight")
        self.step_count = int(state["step"])
        self.stats.load_dict(state["stats"])


def make_strategy(
    model: nn.Module, inner_optimizer: torch.optim.Optimizer, comm: Communicator, *, mode: str = "streaming", **kwargs
) -> Strategy:
    """The strategy for ``mode``: one flag chooses the method.

    ``dp`` builds a :class:`~farsync.algorithms.dp.DataParallel` and drops the arguments
    only DiLoCo has (H, P, τ, α, codec, outer optimizer, …); ``diloco`` and
    ``streaming`` build a :class:`~farsync.algorithms.diloco.DiLoCo`.
    """
    from farsync.algorithms.diloco import DiLoCo
    from farsync.algorithms.dp import DataParallel

    check_choice("mode", mode, MODES)
    if mode == "dp":
        dp_args = inspect.signature(DataParallel).parameters
        diloco_only = set(inspect.signature(DiLoCo).parameters) - set(dp_args)
        return DataParallel(model, inner_optimizer, comm, **{k: v for k, v in kwargs.items() if k not in diloco_only})
    return DiLoCo(model, inner_optimizer, comm, mode=mode, **kwargs)


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
