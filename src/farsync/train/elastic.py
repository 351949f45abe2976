"""An elastic worker's training (torchft, :mod:`farsync.comm.elastic`): the steps of
:class:`~farsync.train.loop.Trainer` that change when workers come and go.

* its own run directory (``RUN/worker-K``: it may share no disk with the others), whose
  checkpoint it resumes on its own when restarted;
* :meth:`~ElasticTrainer.start`: serve joining peers, then join the live workers — all of
  them at once at the start of a run, or the others mid-run (:meth:`~ElasticTrainer.rejoin`);
* a step in which it learns that the others went on without it (:class:`Rejoined`):
  continue from their state;
* metrics: membership changes and retried syncs as rows, sync rows stamped with the time
  they landed, its rows kept on resume (history, not a replay); the summary counts what
  it saw of failures.
"""

from __future__ import annotations

import os
import time
import warnings

import torch

from farsync.comm import rendezvous
from farsync.comm.elastic import ElasticError, Rejoined
from farsync.train import checkpoint as ckpt
from farsync.train import rundir
from farsync.train.config import Config
from farsync.train.loop import Trainer
from farsync.train.summary import summarize


class ElasticTrainer(Trainer):
    """One elastic worker's run (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.comm = self.group.comms[0]
        self._events_logged = 0  # membership events already written

    @staticmethod
    def run_dir_for(cfg: Config, group: rendezvous.Group) -> str:
        return os.path.join(Trainer.run_dir_for(cfg, group), f"worker-{group.rank}")

    @classmethod
    def resumes(cls, run_dir: str, resume: bool, cfg: Config) -> bool:
        """A restarted worker (started with the same command): its inner optimizer and
        data position from its checkpoint; with train.overwrite, a new run."""
        return resume or (not cfg.train.overwrite and ckpt.has_checkpoint(run_dir))

    @classmethod
    def check_run_dir(cls, cfg: Config, run_dir: str, *, resume: bool, resuming: bool,
                      refuse_existing: bool) -> str | None:
        """A worker restarted with the same command resumes its run directory, so only
        a finished run there is refused (when ``refuse_existing``); a restart must use
        the run's settings (:func:`farsync.train.rundir.check_resume`)."""
        if refuse_existing and not resume and not cfg.train.overwrite:
            problem = rundir.fresh_problem(run_dir, finished_only=True)
            if problem:
                return rundir.refusal(problem, run_dir)
        return super().check_run_dir(cfg, run_dir, resume=resume, resuming=resuming, refuse_existing=False)

    def keep_rows(self, step: int, rows: int | None) -> None:
        """Its rows stay: it rejoins the others where they are, and the syncs it took part
        in after this checkpoint happened (a resume redoes them)."""

    def start(self) -> None:
        """Serve joining peers (:meth:`~farsync.algorithms.diloco.DiLoCo.shared_state`),
        then join the live workers."""
        algo = self.workers[0].algo
        self.comm.serve(algo.shared_state)
        r = self.comm.join(self.cfg.algo.workers, self.cfg.elastic.join_timeout_s, step=algo.step_count)
        if r is not None:
            self.rejoin(r)
        self.log_events()

    def train_step(self) -> bool:
        try:
            return super().train_step()
        except Rejoined as r:  # the others went on without this worker: continue from their state
            self.rejoin(r)
            return False

    def rejoin(self, r: Rejoined) -> None:
        """Continue from a live worker's state: θ_g, outer optimizers and schedule position
        from it, the sync it was in landed here too; the learning rate follows the
        schedule step. What this worker trained since its last sync is dropped (at most
        one round of its work); its inner optimizer state is its own (from its last local
        checkpoint, or fresh)."""
        w = self.workers[0]
        landing = None
        if r.result is not None:
            _, f, sent = r.round
            landing = (f, sent, r.result)
        lost = w.algo.step_count  # where this worker was
        w.algo.adopt(r.state, landing)
        s = w.algo.step_count
        w.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            w.scheduler.last_epoch = s - 1
            w.scheduler.step()  # the learning rate of schedule step s
        self.step = s
        if self.metrics.bar is not None:
            self.metrics.bar.n = s
        state_bytes = sum(t.numel() * t.element_size() for t in _tensors(r.state))
        self.metrics.write({"kind": "rejoined", "step": s, "from_step": lost, "behind_syncs": r.behind,
                            "state_bytes": state_bytes, "time": time.time(), "wall_seconds": self.wall()})
        self.metrics.log(f"joined the live workers at step {s} ({r.behind} syncs behind; this worker was at step {lost})")
        self.log_events()

    def log_events(self) -> None:
        """Sync rows stamped with the time they landed here (membership events carry the
        same clock), then membership changes and retried rounds, as this worker saw them."""
        self.metrics.events(self.workers[0].algo.drain_events(), extra={"time": time.time()})
        events = self.comm.events
        for e in events[self._events_logged:]:
            self.metrics.write({"kind": "membership", "step": self.workers[0].algo.step_count, **e})
            if e["event"] == "members":
                self.metrics.log(f"workers now {e['workers']} (lost {e['lost']}, joined {e['joined']})")
            elif e["event"] == "retry":
                self.metrics.log(f"sync {e['round']} failed ({e['why']}); retrying with the workers alive")
        self._events_logged = len(events)

    def land_final(self) -> None:
        try:
            super().land_final()
        except Rejoined as r:  # the others landed the final syncs without this worker
            raise ElasticError(f"this worker fell behind the others in the final syncs (at step {r.state['step']}); "
                               "they hold the final θ_g, this worker's run directory does not") from None

    def summary(self, final_eval: float) -> dict:
        return summarize(self, final_eval, elastic={**_counts(self.comm.events), "authenticated": self.comm.authenticated})


def _counts(events: list[dict]) -> dict:
    """Syncs retried, workers lost and joined, and this worker's heals."""
    members = [e for e in events if e["event"] == "members"]
    return {"syncs_retried": len({tuple(e["round"] or ()) for e in events if e["event"] == "retry"}),
            "workers_lost": sum(len(e["lost"]) for e in members),
            "workers_joined": sum(len(e["joined"]) for e in members),
            "healed": sum(1 for e in events if e["event"] == "healed")}


def _tensors(obj):
    """Every tensor in a nest of dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
