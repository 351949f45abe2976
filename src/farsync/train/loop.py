"""The training loop: one loop for DP, DiLoCo and Streaming DiLoCo.

A process drives a list of *local workers*: all M of them in lock step when simulating
in one process, or just its own under ``torchrun`` (one process per worker; see
:mod:`farsync.comm.rendezvous`). Each step, every local worker that trains runs forward
and backward on its own batch, then :func:`~farsync.algorithms.step_in_lockstep` runs
the strategies' phases (gradient mean for DP, inner step, fragment exchanges and outer
steps when due).

:func:`farsync.train.train` builds a :class:`Trainer` and runs it: :meth:`Trainer.build` (run directory,
data, workers), :meth:`~Trainer.restore` (from a checkpoint), then per step
:meth:`~Trainer.train_step` and :meth:`~Trainer.log_step`, and at the end
:meth:`~Trainer.finish` (land what is in flight, final eval, checkpoint, summary, plots).
The parts it calls: the pacing of unequal workers (:mod:`farsync.train.pacing`), the
metrics (:mod:`farsync.train.metrics`), the summary (:mod:`farsync.train.summary`),
checkpoints (:mod:`farsync.train.checkpoint`); an elastic worker's start and rejoin are
:class:`farsync.train.elastic.ElasticTrainer`'s, which overrides the steps they change.
"""

from __future__ import annotations

import functools
import os
import signal
import time
import warnings
from dataclasses import dataclass

import torch

from farsync.algorithms import Strategy, finish_in_lockstep, make_strategy, step_in_lockstep
from farsync.algorithms.accounting import dp_bytes_per_step
from farsync.comm import rendezvous
from farsync.comm.base import Communicator
from farsync.comm.faults import DieAt, FaultyCommunicator, parse_fault
from farsync.data import Corpus
from farsync.train import checkpoint as ckpt
from farsync.train import components, rundir
from farsync.train.config import Config, ConfigError, to_toml
from farsync.train.metrics import Metrics, log_main
from farsync.train.pacing import make_pacing
from farsync.train.summary import summarize, write_summary


@dataclass
class Worker:
    """One local worker: its model, inner optimizer and schedule, and its strategy."""

    rank: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    algo: Strategy
    last_loss: float = float("nan")
    forward: torch.nn.Module | None = None  # what forward and backward run through (a site's DDP wrapper); None: model


def build_worker(cfg: Config, rank: int, comm: Communicator, vocab_size: int, dev: torch.device,
                 site=None) -> Worker:
    """Worker ``rank``: its model (for a site of several ranks, made one replica over them:
    :func:`~farsync.train.components.parallelize`), inner optimizer, schedule, strategy."""
    model = components.build_model(cfg, vocab_size, dev)
    forward = components.parallelize(cfg, model, site, dev)
    opt = components.inner_optimizer(cfg, model)
    algo = make_strategy(model, opt, comm, **cfg.strategy_kwargs())
    return Worker(rank, model, opt, components.lr_scheduler(cfg, opt), algo, forward=forward)


class _StopFlag:
    """Ctrl-C sets a flag: once every process knows (through a log step's metrics sum,
    read one log interval later), the loop checkpoints and exits.
    A second Ctrl-C interrupts at once (the last complete checkpoint stays valid)."""

    def __init__(self):
        self.requested = False  # this process saw Ctrl-C
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        try:
            self._old = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class Trainer:
    """One training run on this process (see the module docstring)."""

    def __init__(self, cfg: Config, group: rendezvous.Group, dev: torch.device, run_dir: str, corpus: Corpus | None,
                 workers: list[Worker], eval_model: torch.nn.Module | None, eval_set: list, n_params: int,
                 plan: dict | None = None):
        self.cfg, self.group, self.device, self.run_dir = cfg, group, dev, run_dir
        self.corpus, self.workers, self.eval_model, self.eval_set = corpus, workers, eval_model, eval_set
        self.n_params, self.plan = n_params, plan
        self.algos = [w.algo for w in workers]
        self.pacing = make_pacing(cfg, group.local_ranks, real=group.distributed,
                                  sends_after=lambda s: bool(workers[0].algo.due_to_send(s)))
        self.metrics = Metrics(run_dir, group)
        self.stop = _StopFlag()
        self.step = 0  # schedule steps completed
        self.prior_wall = 0.0  # wall seconds of the run before a resume
        self.t_start = time.perf_counter()
        self.die = DieAt.from_env()  # a test hook (farsync.comm.faults)
        self.resuming = False  # continues from a checkpoint (build decides)

    # ---- build and restore -----------------------------------------------------------
    @classmethod
    def build(cls, cfg: Config, group: rendezvous.Group, dev: torch.device, run_dir: str | None, *,
              resume: bool = False, refuse_existing: bool = False) -> Trainer:
        """Run directory and resolved config (with ``algo.auto``, the plan: a resumed run
        keeps its own), corpus, the local workers, the eval model. Nothing is written
        before :meth:`check_run_dir` accepts the run directory."""
        run_dir = run_dir or cls.run_dir_for(cfg, group)
        resuming = cls.resumes(run_dir, resume, cfg)
        problem = cls.check_run_dir(cfg, run_dir, resume=resume, resuming=resuming,
                                    refuse_existing=refuse_existing) if group.is_main else None
        problem = group.broadcast(problem)  # every process refuses alike
        if problem:
            raise ConfigError(problem)
        if group.is_main:
            os.makedirs(run_dir, exist_ok=True)
        log = functools.partial(log_main, group)
        corpus = Corpus.build(cfg.data, log=log)
        plan = None
        if cfg.algo.auto:  # measure the link and the step time, choose H, P, τ and the codec
            from farsync.plan.run import plan_run

            x, y = corpus.worker_batch(group.local_ranks[0], cfg.algo.workers, 0, cfg.train.batch_size,
                                       cfg.model.seq_len, cfg.train.seed)
            try:
                cfg, plan = plan_run(cfg, group, components.build_model(cfg, corpus.vocab_size, dev),
                                     (x.to(dev), y.to(dev)), run_dir, log, keep=resume)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if group.is_main and not resuming:  # a resumed run keeps its own
            with open(os.path.join(run_dir, "config.toml"), "w") as f:
                f.write(to_toml(cfg))
        comms = list(group.comms)
        faulty_rank = cfg.train.faulty_rank < 0 or group.site is None or group.site.rank == cfg.train.faulty_rank
        if cfg.train.fault and cfg.train.faulty_worker in group.local_ranks and faulty_rank:  # farsync.comm.faults
            i = group.local_ranks.index(cfg.train.faulty_worker)
            comms[i] = FaultyCommunicator(comms[i], *parse_fault(cfg.train.fault))
        workers = [build_worker(cfg, r, c, corpus.vocab_size, dev, group.site) for r, c in zip(group.local_ranks, comms)]
        model = workers[0].model
        trainer = cls(cfg, group, dev, run_dir, corpus, workers,
                      eval_model=components.build_model(cfg, corpus.vocab_size, dev),
                      # a site's held-out set: that of a one-rank worker of R times the batch
                      eval_set=corpus.eval_batches(cfg.train.batch_size * group.site_size, cfg.model.seq_len,
                                                   cfg.train.eval_batches),
                      n_params=model.num_parameters(), plan=plan)
        trainer.resuming = resuming
        a, algo = cfg.algo, workers[0].algo
        log(f"model: {components.model_name(cfg, model)}, {trainer.n_params:,} parameters "
            f"({model.num_parameters(non_embedding=True):,} non-embedding); {a.workers} workers, mode {a.mode}" + (
                f", H={a.inner_steps}, P={algo.num_fragments}, τ={algo.sync_delay}, α={algo.mixing}, codec {a.codec}"
                if a.mode != "dp" else ""))
        return trainer

    @staticmethod
    def run_dir_for(cfg: Config, group: rendezvous.Group) -> str:
        """``train.run_dir``/``train.name`` (default: mode-codec-timestamp, rank 0's)."""
        name = cfg.train.name or group.broadcast(rundir.default_name(cfg))
        return os.path.join(cfg.train.run_dir, name)

    @property
    def model_name(self) -> str:
        return components.model_name(self.cfg, self.workers[0].model)

    @classmethod
    def resumes(cls, run_dir: str, resume: bool, cfg: Config) -> bool:
        """Whether the run continues from its checkpoint (asked for with --resume)."""
        return resume

    @classmethod
    def check_run_dir(cls, cfg: Config, run_dir: str, *, resume: bool, resuming: bool,
                      refuse_existing: bool) -> str | None:
        """Why this run may not use ``run_dir`` (None: it may; main process). A resume
        may change nothing of the run's trajectory (:func:`farsync.train.rundir.check_resume`);
        a new run refuses a run directory holding a run when ``refuse_existing`` (what
        ``farsync train`` asks), and with ``train.overwrite`` empties it first."""
        try:
            if resuming:
                if resume and os.path.exists(os.path.join(run_dir, "summary.json")):
                    return f"--resume {run_dir}: the run is finished (it has its summary.json); nothing to resume"
                if os.path.isfile(os.path.join(run_dir, "config.toml")):
                    rundir.check_resume(rundir.saved_config(run_dir), cfg, run_dir)
                return None
            if cfg.train.overwrite:
                rundir.empty(run_dir)
                return None
            problem = rundir.fresh_problem(run_dir) if refuse_existing else None
        except ConfigError as e:
            return str(e)
        return rundir.refusal(problem, run_dir) if problem else None

    def restore(self) -> None:
        """Load the newest usable checkpoint into every local worker (a damaged newer one
        is named and passed over: :func:`farsync.train.checkpoint.resume_step`); drop the
        metrics rows written after it."""
        found = {"step": None, "error": None}
        if self.group.is_main:  # it sees every worker's file of this run directory
            try:
                found["step"] = ckpt.resume_step(self.run_dir, self.group.checkpoint_workers, log=self.metrics.log)
            except ckpt.CheckpointError as e:
                found["error"] = str(e)
        found = self.group.broadcast(found)
        if found["error"]:
            raise ConfigError(f"--resume: {found['error']}")
        step = found["step"]
        if step is None:
            raise ConfigError(f"--resume {self.run_dir}: no checkpoint found there")
        if step >= self.cfg.train.steps:  # its final syncs have landed: training it again would change it
            raise ConfigError(f"--resume {self.run_dir}: the run is finished (its checkpoint is of step {step}, "
                              f"train.steps = {self.cfg.train.steps}); nothing to resume")
        rows = None
        for w in self.workers:
            state = ckpt.load_worker(self.run_dir, step, self.group.file_id(w.rank), map_location=self.device)
            components.load_model_state(w.model, state["model"])
            components.load_optimizer_state(w.optimizer, state["optimizer"])
            w.scheduler.load_state_dict(state["scheduler"])
            w.algo.load_state_dict(state["algo"])
            self.prior_wall = state["wall_seconds"]
            rows = state.get("metrics_rows", rows)
        self.step = step
        self.keep_rows(step, rows)
        self.metrics.log(f"resumed {self.run_dir} at step {step}")

    def keep_rows(self, step: int, rows: int | None) -> None:
        """metrics.jsonl after a resume from ``step``: the ``rows`` written before its
        checkpoint (a sync row of step ``step`` may land, and be written, after it;
        checkpoints of older farsync versions: the rows up to ``step``)."""
        if rows is None:
            self.metrics.drop_rows_after(step)
        else:
            self.metrics.keep_first_rows(rows)

    # ---- the loop ---------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict:
        """Restore or start afresh, train every step, finish."""
        if self.resuming:
            self.restore()
        else:
            self.metrics.fresh()
        return self.loop()

    def loop(self) -> dict:
        cfg, steps = self.cfg, self.cfg.train.steps
        every = cfg.train.checkpoint_interval()
        self.metrics.open(cfg, self.step)
        self.t_start = time.perf_counter() - self.prior_wall
        self.pacing.start(self.step, [a.steps_trained for a in self.algos])
        self.start()
        with self.stop:
            while self.step < steps:
                if not self.train_step():
                    continue  # this worker moved to where the others are (an elastic rejoin)
                self.step += 1
                done, last = self.step, self.step == steps
                if done % cfg.train.log_every == 0 or last:
                    self.log_step()
                if done % cfg.train.eval_every == 0 and not last:
                    self.metrics.write({"kind": "eval", "step": done, "tokens": self.pacing.tokens_at(done),
                                        "eval_loss": self.eval_loss(), "wall_seconds": self.wall()})
                if self.metrics.bar is not None:
                    self.metrics.bar.update(1)
                if last:
                    break
                if self.metrics.stop_agreed or (every and done % every == 0):
                    self.save(done)  # lands the pending metrics first, which may agree a stop
                if self.metrics.stop_agreed:
                    return self.stopped()
        return self.finish()

    def start(self) -> None:
        """Before the first step (nothing here; an elastic worker joins the others)."""

    def train_step(self) -> bool:
        """Schedule step ``self.step``: forward/backward of every local worker that trains
        at it, then the strategies' phases in lock step; True (it was trained here).

        Compute time is measured here and added to each worker's stats: its own forward
        and backward (:meth:`~farsync.train.pacing.Pacing.computed`: a slower worker's
        slowdown under torchrun included), plus an even share of the phases' time minus
        the time they were blocked (which the strategies record themselves). A slower
        worker's data continues where it stopped."""
        cfg, step = self.cfg, self.step
        B, T = cfg.train.batch_size, cfg.model.seq_len
        active = [self.pacing.trains(i, step) for i in range(len(self.workers))]
        spent = []
        for i, (w, on) in enumerate(zip(self.workers, active)):
            if not on:
                continue
            t0 = time.perf_counter()
            x, y = self.batch(w)
            w.last_loss = components.forward_backward(w.forward or w.model, x.to(self.device), y.to(self.device)).item()
            if self.die is not None:
                self.die.after_backward(step + 1, bool(w.algo.due_to_send(step + 1)))
            dt = time.perf_counter() - t0
            spent.append(dt)
            w.algo.stats.add_compute(self.pacing.computed(i, dt))
        self.pacing.end_compute(step, spent, [a.stats.inner_steps for a in self.algos])
        blocked_before = sum(a.stats.blocked_seconds for a in self.algos)
        t0 = time.perf_counter()
        step_in_lockstep(self.algos, before_inner_step=lambda a: components.clip_gradients(cfg, a.model),
                         tokens=[B * T if on else 0 for on in active], active=active)
        self.log_events()
        blocked = sum(a.stats.blocked_seconds for a in self.algos) - blocked_before
        share = max(0.0, time.perf_counter() - t0 - blocked) / len(self.workers)
        for w, on in zip(self.workers, active):
            w.algo.stats.add_compute(share)  # inner steps and in-process exchange arithmetic
            with warnings.catch_warnings():
                if not on:  # the learning rate follows schedule steps, also those a worker sits out
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                w.scheduler.step()
            w.optimizer.zero_grad(set_to_none=True)
        return True

    def batch(self, w: Worker) -> tuple[torch.Tensor, torch.Tensor]:
        """Worker ``w``'s next batch (a slower worker's data continues where it stopped).
        A site of R ranks draws R × train.batch_size sequences and each rank trains its
        share: the worker trains exactly what one rank with R times the batch would."""
        cfg, site = self.cfg, self.group.site
        R = 1 if site is None else site.size
        B = cfg.train.batch_size
        x, y = self.corpus.worker_batch(w.rank, cfg.algo.workers, w.algo.steps_trained, B * R, cfg.model.seq_len,
                                        cfg.train.seed)
        if site is not None:
            x, y = x[site.rank * B:(site.rank + 1) * B], y[site.rank * B:(site.rank + 1) * B]
        return x, y

    def log_events(self) -> None:
        """The syncs landed, exclusions and skipped rounds since the last call (every
        worker sees the same: worker 0's are logged)."""
        for a in self.algos[1:]:
            a.drain_events()
        self.metrics.events(self.algos[0].drain_events())

    def log_step(self) -> None:
        """A metrics row for the step just done (losses and bytes summed over every
        worker, and whether any process saw Ctrl-C), written when its sum lands."""
        done, workers = self.step, self.workers
        st = workers[0].algo.stats
        local = [sum(w.last_loss for w in workers), float(self.stop.requested),
                 float(sum(w.algo.stats.total_bytes for w in workers)), float(sum(w.algo.stats.tokens for w in workers))]
        row = {
            "kind": "train", "step": done, "tokens": self.pacing.tokens_at(done), "train_loss": None,
            "lr": workers[0].scheduler.get_last_lr()[0], "wall_seconds": self.wall(),
            "bytes_sent_per_worker": None, "dp_bytes_per_worker": done * dp_bytes_per_step(self.cfg.algo.workers, st.num_parameters),
            "sync_events": st.sync_events,
        }
        self.metrics.log_step(row, local)

    def eval_loss(self) -> float:
        """θ_g's held-out loss."""
        return components.evaluate(self.eval_model, self.algos[0].global_parameters(), self.eval_set, self.device)

    def wall(self) -> float:
        return time.perf_counter() - self.t_start

    # ---- checkpoints and the end ----------------------------------------------------
    def save(self, step: int) -> None:
        """Every local worker's checkpoint; the main process commits it once all files
        exist. The pending metrics land first: a resume from here finds every row up to
        ``step``."""
        self.metrics.land()
        for w in self.workers:
            ckpt.save_worker(self.run_dir, step, self.group.file_id(w.rank), {
                # a sharded model's shards are this rank's (components.local_tree)
                "model": components.local_tree(w.model.state_dict()),
                "optimizer": components.local_tree(w.optimizer.state_dict()),
                "scheduler": w.scheduler.state_dict(), "algo": w.algo.state_dict(),
                "step": step, "wall_seconds": self.wall(),
                "metrics_rows": self.metrics.rows,  # metrics.jsonl's rows before this checkpoint (main process)
            })
        self.group.barrier()
        if self.group.is_main:
            ckpt.commit(self.run_dir, step, self.cfg.algo.workers, self.group.checkpoint_workers,
                        keep=self.cfg.train.keep_checkpoints)

    def stopped(self) -> dict:
        """Ctrl-C, agreed by every process: the checkpoint is written; say how to resume."""
        self.close()
        self.metrics.log(f"stopped at step {self.step}; checkpoint saved. Resume with: farsync train --resume {self.run_dir}")
        return {"stopped_at": self.step, "run_dir": self.run_dir}

    def land_final(self) -> None:
        """Land what is in flight and the final syncs (θ_g then holds every inner step)."""
        finish_in_lockstep(self.algos)

    def finish(self) -> dict:
        """Land what is in flight, evaluate θ_g, checkpoint, write summary and plots."""
        steps = self.cfg.train.steps
        self.metrics.close_bar()
        self.land_final()
        self.log_events()
        final_eval = self.eval_loss()
        self.metrics.land()  # the last step's row and train loss (the last step always logs)
        self.metrics.write({"kind": "eval", "step": steps, "tokens": self.pacing.tokens_at(steps),
                            "eval_loss": final_eval, "wall_seconds": self.wall()})
        self.save(steps)
        summary = self.summary(final_eval)
        self.group.barrier()  # every worker is past the last collective before any tears down
        self.close()
        if self.group.is_main:
            write_summary(self.run_dir, summary)
            from farsync.train.plots import plot_run

            plot_run(self.run_dir)
        return summary

    def summary(self, final_eval: float) -> dict:
        return summarize(self, final_eval)

    def close(self) -> None:
        self.metrics.close()
