"""Training runs: :func:`train` is what ``farsync train`` calls.

    config       the typed configuration (sections, recipes, overrides)
    components   model, inner optimizer, lr schedule, one inner step, evaluation
    session      threads, device and the group of workers, for the length of a run
    loop         Trainer: build / restore / step / log / finish
    elastic      ElasticTrainer: the steps an elastic worker changes
    pacing       algo.schedule: which steps workers of unequal speed train
    metrics      metrics.jsonl, trackers, progress bar, deferred sums
    summary      summary.json
    checkpoint   checkpoints a crash cannot leave half-written
    export, plots, compare, loggers
"""

from __future__ import annotations


def train(cfg, *, run_dir: str | None = None, resume: bool = False) -> dict:
    """Train per ``cfg`` (a :class:`farsync.train.config.Config`); write the run directory;
    return the summary (or, for a run stopped by Ctrl-C, where it stopped). ``run_dir``
    with ``resume=True`` continues the run saved there."""
    from farsync.train.elastic import ElasticTrainer
    from farsync.train.loop import Trainer
    from farsync.train.session import session

    with session(cfg) as (group, dev):
        trainer = (ElasticTrainer if group.elastic else Trainer).build(cfg, group, dev, run_dir, resume=resume)
        try:
            return trainer.run(resume)
        finally:
            trainer.close()
