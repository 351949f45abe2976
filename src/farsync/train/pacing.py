"""How workers of unequal speed go through a round (``algo.schedule``): one object per
pacing, asked by the trainer which steps each of its workers trains.

* :class:`Lockstep` — every worker takes every step; the fast wait for the slowest.
* :class:`Steps` — a worker of relative speed v trains ⌈v·n⌉ of n schedule steps,
  spread evenly, and sits the rest out.
* :class:`TimeBudget` — a worker trains a step only if it can finish it before the next
  sync's deadline (step t's is (t + 1)·``algo.round_seconds``/H after the start) and sits
  out the rest of that window.

Clocks are real under ``torchrun`` (a slower worker sleeps (1/v − 1) × its compute after
each step it trains, and time-budget deadlines are wall-clock) and simulated in one
process (nothing sleeps; :attr:`Pacing.sim_seconds` adds up what real workers of those
speeds would take, and time-budget counts time in steps of the fastest worker).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from farsync.train.config import Config


def trained_steps(rel_speed: float, steps: int) -> int:
    """Steps a worker of ``rel_speed`` (≤ 1, relative to the fastest) trains among the
    first ``steps`` schedule steps: ⌈steps·v⌉, spread evenly, the first one included
    (the learning-rate schedule follows schedule steps, for every worker alike)."""
    return math.ceil(steps * rel_speed - 1e-9)


def trains_at(rel_speed: float, step: int) -> bool:
    """Whether a worker of ``rel_speed`` trains at schedule step ``step`` (0-based)."""
    return trained_steps(rel_speed, step + 1) > trained_steps(rel_speed, step)


class Pacing:
    """Which schedule steps the local workers train, and the clock behind it.

    ``speeds``: algo.worker_speeds, one per worker of the run; ``local_ranks``: the
    workers this process drives; ``real``: wall clocks (torchrun) or simulated ones (one
    process); ``sends_after(step)``: whether a sync is sent after schedule step ``step``
    (1-based).
    """

    def __init__(self, cfg: Config, local_ranks: list[int], *, real: bool, sends_after: Callable[[int], bool]):
        self.cfg, self.local_ranks, self.real, self.sends_after = cfg, list(local_ranks), real, sends_after
        self.speeds = cfg.algo.speeds()
        self.rel_speeds = self._relative()
        self.sim_seconds = 0.0  # one process, unequal speeds: the wall clock real workers would take

    def _relative(self) -> list[float]:
        """Each worker's speed relative to the fastest (all 1 in lockstep)."""
        return [v / max(self.speeds) for v in self.speeds]

    def start(self, step: int, steps_trained: list[int]) -> None:
        """Training (re)starts at schedule step ``step``; ``steps_trained`` by each local worker."""

    def trains(self, i: int, step: int) -> bool:
        """Whether local worker ``i`` trains at schedule step ``step`` (0-based)."""
        return True

    def computed(self, i: int, seconds: float) -> float:
        """Local worker ``i`` took ``seconds`` for its forward and backward; the compute
        time to charge it. Under torchrun a slower worker sleeps (1/v − 1) × that here."""
        slowdown = max(self.speeds) / self.speeds[self.local_ranks[i]] - 1.0
        if self.real and slowdown > 0:
            time.sleep(seconds * slowdown)
            seconds *= 1.0 + slowdown
        return seconds

    def end_compute(self, step: int, spent: list[float], steps_trained: list[int]) -> None:
        """Every local worker that trains at ``step`` has computed its gradients (``spent``
        seconds each, before :meth:`computed`'s slowdown); ``steps_trained`` so far by each.
        In one process with unequal speeds: add what real workers would take (the mean
        compute of those training, × fastest/slowest in lockstep, where everyone waits for
        the slowest)."""
        if not self.real and len(set(self.speeds)) > 1 and spent:
            self.sim_seconds += sum(spent) / len(spent) * self._wait_factor()

    def _wait_factor(self) -> float:
        return 1.0

    def tokens_at(self, steps: int) -> int:
        """Tokens all workers have trained on after ``steps`` schedule steps, as the
        pacing plans it (exact but for time-budget under torchrun, where real clocks
        decide; train rows and the summary count what was really trained)."""
        per = self.cfg.train.batch_size * self.cfg.model.seq_len
        return per * sum(trained_steps(v, steps) for v in self.rel_speeds)


class Lockstep(Pacing):
    """Every worker takes every step."""

    def _relative(self) -> list[float]:
        return [1.0] * len(self.speeds)

    def _wait_factor(self) -> float:
        return max(self.speeds) / min(self.speeds)


class Steps(Pacing):
    """A worker of relative speed v trains ⌈v·n⌉ of the first n steps."""

    def trains(self, i: int, step: int) -> bool:
        return trains_at(self.rel_speeds[self.local_ranks[i]], step)


class TimeBudget(Pacing):
    """A step is trained only if it ends by the deadline of the next sync; a worker that is
    free works on without pause and waits only at syncs it is early for.

    Simulated (one process): each local worker's clock is where its last step ended, in
    steps of the fastest worker (a step of speed v takes 1/v). Real (torchrun): its
    estimate of its next step's time is the last one's, halved after each sync window in
    which it trained nothing (so that a stale estimate cannot keep it out for good), and
    ``t0`` is the wall-clock time at which step 0's window opened.
    """

    def start(self, step: int, steps_trained: list[int]) -> None:
        a = self.cfg.algo
        self.clock = [0.0 if self.real else float(step)] * len(self.local_ranks)
        self.trained_by_sync = list(steps_trained)
        self.t0 = time.perf_counter() - step * a.round_seconds / a.inner_steps

    def _deadline(self, step: int) -> float:
        """When schedule step ``step`` (0-based) must have ended, wall clock."""
        a = self.cfg.algo
        return self.t0 + (step + 1) * a.round_seconds / a.inner_steps

    def _next_sync(self, step: int) -> int:
        """The first schedule step ≥ ``step`` (0-based) after which a fragment is sent."""
        t = step
        while not self.sends_after(t + 1):
            t += 1
        return t

    def trains(self, i: int, step: int) -> bool:
        sync = self._next_sync(step)
        if self.real:
            return time.perf_counter() + self.clock[i] <= self._deadline(sync)
        end = self.clock[i] + 1.0 / self.rel_speeds[self.local_ranks[i]]
        if end > sync + 1 + 1e-9:
            return False
        self.clock[i] = end
        return True

    def computed(self, i: int, seconds: float) -> float:
        seconds = super().computed(i, seconds)
        if self.real:
            self.clock[i] = seconds
        return seconds

    def end_compute(self, step: int, spent: list[float], steps_trained: list[int]) -> None:
        super().end_compute(step, spent, steps_trained)
        if not self.sends_after(step + 1):
            return
        if not self.real:  # a sync follows: everyone's clock moves to its deadline
            self.clock = [max(c, step + 1.0) for c in self.clock]
            return
        ahead = self._deadline(step) - time.perf_counter()  # early for the sync: wait for its deadline
        if ahead > 0:
            time.sleep(ahead)
        for i, n in enumerate(steps_trained):
            if n == self.trained_by_sync[i]:
                self.clock[i] /= 2  # nothing trained this window
            self.trained_by_sync[i] = n


PACINGS = {"lockstep": Lockstep, "steps": Steps, "time-budget": TimeBudget}


def make_pacing(cfg: Config, local_ranks: list[int], *, real: bool, sends_after: Callable[[int], bool]) -> Pacing:
    """The pacing of ``algo.schedule``."""
    return PACINGS[cfg.algo.schedule](cfg, local_ranks, real=real, sends_after=sends_after)
