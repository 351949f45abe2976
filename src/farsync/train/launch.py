"""``train.launch``: simulated workers in this process, or one local process per worker.

On a machine with cores to spare, ``farsync train`` starts the M workers as local
processes — the ``torchrun`` path (gloo over localhost), started by farsync itself through
torch's own launcher (:func:`torch.distributed.launcher.api.elastic_launch`, one
rendezvous on localhost, no restarts): one progress bar (rank 0's), one run directory,
the same summary and, for the same settings, the same numbers as the in-process
simulation (both backends run the same exchange arithmetic). A worker process that dies
takes the others down within a second (the launcher's monitor), and the parent says so in
one line. Ctrl-C reaches every worker, which checkpoint and stop together as ever.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import uuid

from farsync.comm.rendezvous import launched_by_torchrun
from farsync.train.config import Config

LAUNCHES = ("auto", "inprocess", "processes")
#: set for the worker processes: the parent, not they, prints the run's summary
CHILD_ENV = "FARSYNC_LAUNCHED"
#: how long a launched worker that lost the others waits before it exits, so that the
#: launcher (polling every 0.2 s) sees the worker that died first and names it
LOST_GRACE_S = 1.0


class LaunchError(RuntimeError):
    """A worker process failed; the run stopped (``farsync train`` prints it as one line)."""


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def choose(cfg: Config) -> tuple[str, str]:
    """(``inprocess`` or ``processes``, why) for this run. Under torchrun and for an
    elastic worker there is nothing to choose: this process is one worker."""
    t, a = cfg.train, cfg.algo
    if launched_by_torchrun() or cfg.elastic.enabled:
        return "inprocess", "this process is one worker"
    if t.launch != "auto":
        return t.launch, f"train.launch={t.launch}"
    if a.workers < 2:
        return "inprocess", "one worker"
    if len(set(a.speeds())) > 1 or a.schedule != "lockstep":
        return "inprocess", "unequal workers keep their simulated clock"
    if a.auto:
        return "inprocess", "algo.auto plans for a link, and local processes have none to measure"
    if t.device == "cuda":
        return "inprocess", "one device"
    n = cores()
    if n < 2:
        return "inprocess", "1 core"
    return "processes", f"{n} cores"


def train_in_processes(cfg: Config, run_dir: str | None, resume: bool, why: str, refuse_existing: bool = False) -> dict:
    """Train with one process per worker under torch's launcher; the summary (or, after
    Ctrl-C, where the run stopped). The run directory is checked here, once, as a run in
    this process would check it (``refuse_existing``: see :func:`farsync.train.train`).
    LaunchError naming the process that failed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from farsync.data import Corpus
    from farsync.train import checkpoint as ckpt
    from farsync.train import rundir
    from farsync.train.config import ConfigError
    from farsync.train.loop import Trainer

    M = cfg.algo.workers
    if run_dir is None:  # the run's name is decided once, here, for every worker
        run_dir = os.path.join(cfg.train.run_dir, cfg.train.name or rundir.default_name(cfg))
    problem = Trainer.check_run_dir(cfg, run_dir, resume=resume, resuming=resume, refuse_existing=refuse_existing)
    if problem:
        raise ConfigError(problem)
    if not resume and not refuse_existing:
        rundir.empty(run_dir)  # the library's new run writes over an old one (the workers would refuse it)
    # data errors once, here (rank 0 reports the data as ever), and every worker then reads the cached tokens
    Corpus.build(cfg.data, log=lambda m: None)
    if resume:  # a checkpoint the workers cannot use, once, here
        ckpt.resume_step(run_dir, list(range(M)))
    _preload()
    print(f"launch: {M} worker processes on this machine (train.launch={cfg.train.launch}: {why})",
          file=sys.stderr, flush=True)
    # on Linux forked, not spawned: a worker starts with torch and farsync already imported
    # (a fresh interpreter per worker spends ~3 s of CPU on imports, every worker at once)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=M, run_id=f"farsync-{uuid.uuid4().hex[:12]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
                          start_method="fork" if sys.platform == "linux" else "spawn",
                          signals_to_handle="SIGTERM,SIGHUP,SIGQUIT")
    # the launcher's own log of a failed worker is a traceback; the parent says it in one line
    for name in ("torch.distributed.elastic", "torch.multiprocessing"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the workers' to handle
    saved = {k: os.environ.get(k) for k in (CHILD_ENV, "TOKENIZERS_PARALLELISM")}
    os.environ[CHILD_ENV] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers read the cached tokens; no tokenizer threads
    try:
        elastic_launch(config, _worker)(cfg, run_dir, resume)
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        if codes == {130}:  # every worker stopped on Ctrl-C after its checkpoint
            return {"stopped_at": ckpt.latest_step(run_dir), "run_dir": run_dir}
        summary = _summary(run_dir)
        if codes == {1} and summary is not None and summary.get("failure"):
            return summary  # trained to the end, and said why the model is no good
        rank, failure = e.get_first_failure()
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with code {failure.exitcode}")
        raise LaunchError(f"worker process {rank} of {M} {how}; the other workers were stopped "
                          f"(resume from the last checkpoint with: farsync train --resume {run_dir})") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        signal.signal(signal.SIGINT, old)
    summary = _summary(run_dir)
    if summary is None:
        raise LaunchError(f"the worker processes ended without writing {run_dir}/summary.json")
    return summary


def _preload() -> None:
    """Import here, once, what every forked worker would otherwise import on its own: a
    process's first optimizer pulls in ~800 modules of torch's compiler stack (~1 s of CPU)."""
    import torch

    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])


def _worker(cfg: Config, run_dir: str, resume: bool) -> None:
    """One launched worker (a forked process, the launcher's RANK, WORLD_SIZE and
    MASTER_ADDR in its environment): the run in ``run_dir``, which the parent checked. Its
    exit code tells the parent how it ended: 0, 1 (a failure, said in one line on stderr),
    2 (bad input, one line) or 130 (stopped by Ctrl-C after its checkpoint)."""
    from farsync.comm.elastic import ElasticError
    from farsync.comm.rendezvous import WorkerLost
    from farsync.train import train

    try:
        summary = train(cfg, run_dir=run_dir, resume=resume)
    except (ElasticError, WorkerLost, LaunchError, ValueError) as e:
        if os.environ.get("FARSYNC_DEBUG"):
            raise
        bad_input = isinstance(e, ValueError)
        if not bad_input or os.environ.get("RANK") == "0":  # every worker refuses bad input alike: one says it
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2 if bad_input else 1)
    if "stopped_at" in summary:
        sys.exit(130)
    if summary.get("failure"):
        sys.exit(1)


def _summary(run_dir: str) -> dict | None:
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
