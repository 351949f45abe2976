"""Training runs: :func:`train` is what ``farsync train`` calls.

    config       the typed configuration (sections, recipes, overrides)
    components   model, inner optimizer, lr schedule, one inner step, evaluation
    session      threads, device and the group of workers, for the length of a run
    launch       train.launch: simulated workers in this process, or one local process each
    loop         Trainer: build / restore / step / log / finish
    elastic      ElasticTrainer: the steps an elastic worker changes
    pacing       algo.schedule: which steps workers of unequal speed train
    metrics      metrics.jsonl, trackers, progress bar, deferred sums
    summary      summary.json
    checkpoint   checkpoints a crash cannot leave half-written
    export, plots, compare, loggers
"""

from __future__ import annotations

import os
import time


def train(cfg, *, run_dir: str | None = None, resume: bool = False, refuse_existing: bool = False,
          fork_workers: bool = False) -> dict:
    """Train per ``cfg`` (a :class:`farsync.train.config.Config`); write the run directory;
    return the summary (or, for a run stopped by Ctrl-C, where it stopped). ``run_dir``
    with ``resume=True`` continues the run saved there. ``refuse_existing`` (what
    ``farsync train`` asks): a run directory that already holds a run is refused unless
    ``train.overwrite``; without it, a new run writes over it (the benchmarks' own work
    directories). ``fork_workers`` (what ``farsync train`` asks, from a process that has run
    no torch work: an OpenMP pool does not survive a fork): with train.launch picking local
    processes, fork them from this one (Linux) instead of starting fresh interpreters, which
    saves each worker seconds of imports. Under torchrun, a worker that loses the others
    (one died, or its link broke) raises :class:`farsync.comm.rendezvous.WorkerLost`."""
    from farsync.comm.rendezvous import WorkerLost, lost_peer
    from farsync.train.elastic import ElasticTrainer
    from farsync.train.launch import CHILD_ENV, LOST_GRACE_S, choose, train_in_processes
    from farsync.train.loop import Trainer
    from farsync.train.session import session

    launch, why = choose(cfg)
    if launch == "processes":  # one local process per worker (train.launch)
        return train_in_processes(cfg, run_dir, resume, why, refuse_existing, fork=fork_workers)
    with session(cfg) as (group, dev):
        where = run_dir
        try:
            trainer = (ElasticTrainer if group.elastic else Trainer).build(cfg, group, dev, run_dir, resume=resume,
                                                                           refuse_existing=refuse_existing)
            where = trainer.run_dir
            try:
                return trainer.run(resume)
            finally:
                trainer.close()
        except RuntimeError as e:
            why = lost_peer(e) if group.distributed and not group.elastic else None
            if why is None:
                raise
            if os.environ.get(CHILD_ENV):
                time.sleep(LOST_GRACE_S)  # the launcher names the worker that died, not this one
            raise WorkerLost(f"lost the other workers ({why}): one died or the link to it broke; a torchrun run has "
                             "no fault tolerance: start every worker again with --resume "
                             f"{where or 'RUN_DIR'} (from its last checkpoint), or run elastic (elastic.enabled)") from None
