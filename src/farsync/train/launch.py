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
import tempfile
import uuid

from farsync.comm.rendezvous import launched_by_torchrun
from farsync.train.config import Config, to_toml

LAUNCHES = ("auto", "inprocess", "processes")
#: set for the worker processes: the parent, not they, prints the run's summary
CHILD_ENV = "FARSYNC_LAUNCHED"
#: how long a launched worker that lost the others waits before it exits, so that the
#: launcher (polling every 0.2 s) sees the worker that died first and names it
LOST_GRACE_S = 1.0
#: the signals torch's launcher handles in the parent (and passes on to the workers)
_SIGNALS = ("SIGTERM", "SIGHUP", "SIGQUIT")


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


def train_in_processes(cfg: Config, run_dir: str | None, resume: bool, why: str, refuse_existing: bool = False,
                       fork: bool = False) -> dict:
    """Train with one process per worker under torch's launcher; the summary (or, after
    Ctrl-C, where the run stopped). The run directory is checked here, once, as a run in
    this process would check it (``refuse_existing``: see :func:`farsync.train.train`).
    ``fork`` (Linux): fork the workers from this process, which must have run no torch work
    (an OpenMP pool does not survive a fork); otherwise each is a fresh interpreter.
    LaunchError naming the process that failed (ConfigError if it refused its input)."""
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
    fork = fork and sys.platform == "linux"
    if fork:
        _preload()
    print(f"launch: {M} worker processes on this machine (train.launch={cfg.train.launch}: {why})",
          file=sys.stderr, flush=True)
    # forked: a worker starts with torch and farsync already imported (a fresh interpreter
    # per worker spends ~3 s of CPU on imports, every worker at once)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=M, run_id=f"farsync-{uuid.uuid4().hex[:12]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
                          start_method="fork" if fork else "spawn", signals_to_handle=",".join(_SIGNALS))
    handlers = {n: signal.getsignal(getattr(signal, n)) for n in ("SIGINT", *_SIGNALS)}
    loggers = {n: logging.getLogger(n).level for n in ("torch.distributed.elastic", "torch.multiprocessing")}
    saved = {k: os.environ.get(k) for k in (CHILD_ENV, "TOKENIZERS_PARALLELISM", "TORCHELASTIC_SIGNALS_TO_HANDLE")}
    for n in loggers:  # the launcher's own log of a failed worker is a traceback; the parent says it in one line
        logging.getLogger(n).setLevel(logging.CRITICAL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the workers' to handle
    os.environ[CHILD_ENV] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers read the cached tokens; no tokenizer threads
    tmp = None
    try:
        if fork:
            elastic_launch(config, _worker)(cfg, run_dir, resume)
        else:  # a fresh interpreter runs this module (not the caller's __main__, as spawn would)
            fd, tmp = tempfile.mkstemp(prefix="farsync-launch-", suffix=".toml")
            with os.fdopen(fd, "w") as f:
                f.write(to_toml(cfg))
            elastic_launch(config, sys.executable)("-m", "farsync.train.launch", tmp, run_dir, str(int(resume)))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode == 2:
            raise ConfigError(f"worker process {rank} of {M} refused the run (the error above)") from None
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with code {failure.exitcode}{_last_line(failure.message)}")
        raise LaunchError(f"worker process {rank} of {M} {how}; the other workers were "
                          f"stopped (resume from the last checkpoint with: farsync train --resume {run_dir})") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for n, h in handlers.items():
            signal.signal(getattr(signal, n), h)
        for n, level in loggers.items():
            logging.getLogger(n).setLevel(level)
        if tmp is not None:
            os.unlink(tmp)
    # every worker ended (exit 0): trained to the end (a summary, maybe saying why the model
    # is no good), or stopped by Ctrl-C after its checkpoint (none)
    summary = _summary(run_dir)
    return summary if summary is not None else {"stopped_at": ckpt.latest_step(run_dir), "run_dir": run_dir}


def _last_line(message) -> str:
    """': <the last line of a worker's error>' from the launcher's record of it, or ''."""
    if isinstance(message, dict):
        message = message.get("message", "")
    lines = [x.strip() for x in str(message or "").splitlines() if x.strip() and x.strip() != "<N/A>"]
    return f": {lines[-1]}" if lines else ""


def _preload() -> None:
    """Import here, once, what every forked worker would otherwise import on its own: a
    process's first optimizer pulls in ~800 modules of torch's compiler stack (~1 s of CPU)."""
    import torch

    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])


def _worker(cfg: Config, run_dir: str, resume: bool) -> None:
    """One launched worker (the launcher's RANK, WORLD_SIZE and MASTER_ADDR in its
    environment): the run in ``run_dir``, which the parent checked. It exits 0 when the run
    ended (its summary written, or stopped by Ctrl-C after its checkpoint: rank 0 may still be
    writing when the others are done, and the launcher stops every worker at the first
    non-zero exit), 1 on a failure, 2 on bad input (each said in one line on stderr)."""
    for n in _SIGNALS:  # the launcher's handlers, copied by fork: the parent's, not a worker's
        signal.signal(getattr(signal, n), signal.SIG_DFL)
    from farsync.comm.elastic import ElasticError
    from farsync.comm.rendezvous import WorkerLost
    from farsync.train import train
    from farsync.train.config import ConfigError

    try:
        train(cfg, run_dir=run_dir, resume=resume)
    except (ElasticError, WorkerLost, LaunchError, ValueError) as e:
        if os.environ.get("FARSYNC_DEBUG"):
            raise
        alike = isinstance(e, ConfigError)  # every worker refuses the same settings: one says it
        if not alike or os.environ.get("RANK") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(e, ValueError) else 1)


def _summary(run_dir: str) -> dict | None:
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


if __name__ == "__main__":  # a launched worker in a fresh interpreter: CONFIG.toml RUN_DIR RESUME(0|1)
    from farsync.train.config import build_config
    from farsync.train.launch import _worker as worker
    from farsync.train.rundir import read_recipe

    worker(build_config(read_recipe(sys.argv[1])), sys.argv[2], sys.argv[3] == "1")
