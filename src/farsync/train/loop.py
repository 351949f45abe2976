"""The training loop: one loop for DP, DiLoCo and Streaming DiLoCo.

A process drives a list of *local workers*: all M of them in lock step when simulating
in one process, or just its own under ``torchrun`` (one process per worker; see
:mod:`farsync.comm.rendezvous`). Either way each step is: every local worker runs
forward/backward on its own batch, then :func:`~farsync.algorithms.step_in_lockstep`
runs the strategy's phases (gradient mean for DP, inner step, fragment exchanges and
outer steps when due).

:func:`train` is five named steps over one :class:`Run` that holds the state:
:func:`build` (config, data, workers), :func:`restore` (from a checkpoint), then per
step :func:`train_step` and :func:`log_step`, and at the end :func:`finish` (land what
is in flight, final eval, checkpoint, summary, plots).

A log step's metrics are summed over the processes while training goes on: the sum is
started at one log step and its row written at the next (:func:`land_metrics`; also
before every checkpoint and at the end), so the loop never waits for it on the link.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
import warnings
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import IO, Any

import torch

from farsync.algorithms import Strategy, finish_in_lockstep, make_strategy, step_in_lockstep
from farsync.algorithms.accounting import dp_bytes_per_step
from farsync.comm import rendezvous
from farsync.comm.base import Communicator
from farsync.comm.elastic import ElasticError, Rejoined
from farsync.comm.faults import FaultyCommunicator, parse_fault
from farsync.data import Corpus
from farsync.models import Llama, model_config
from farsync.train import checkpoint as ckpt
from farsync.train.config import Config, ConfigError, to_toml
from farsync.units import format_bytes


@dataclass
class Worker:
    rank: int
    model: Llama
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    algo: Strategy
    last_loss: float = math.nan


def lr_lambda(cfg: Config):
    """Linear warmup, then cosine decay to min_lr_ratio × lr at the last step."""
    o, total = cfg.optim, cfg.train.steps

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _device(cfg: Config) -> torch.device:
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is available")
        return torch.device("cuda", rendezvous.local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def build_model(cfg: Config, vocab_size: int, device: torch.device) -> torch.nn.Module:
    """farsync's Llama of ``model.size``, or the transformers architecture of
    ``model.hf_config``; random weights, the same on every worker."""
    torch.manual_seed(cfg.train.seed)  # every worker starts from the same θ_g
    if cfg.model.hf_config:
        from farsync.models.hf import HFCausalLM

        try:
            return HFCausalLM.from_config_file(cfg.model.hf_config, vocab_size, cfg.model.seq_len).to(device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    mcfg = model_config(cfg.model.size, vocab_size, cfg.model.seq_len, z_loss=cfg.model.z_loss,
                        qk_norm=cfg.model.qk_norm)
    return Llama(mcfg).to(device)


def model_name(cfg: Config, model: torch.nn.Module) -> str:
    """``model.size``, or the transformers class and its config file."""
    if cfg.model.hf_config:
        return f"{type(model.hf).__name__} from {cfg.model.hf_config}"
    return cfg.model.size


def inner_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The inner optimizer of every worker: AdamW with the compensated weight decay."""
    o = cfg.optim
    return torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=cfg.inner_weight_decay())


def local_step(cfg: Config, model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor) -> float:
    """One inner step outside a strategy (a federated client, the planner's rehearsal): the
    forward and backward of :func:`train_step`, clipping, the optimizer step; the loss."""
    with _autocast(x.device):
        _, loss = model(x, y)
    loss.backward()
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def build_worker(cfg: Config, rank: int, comm: Communicator, vocab_size: int, device: torch.device) -> Worker:
    model = build_model(cfg, vocab_size, device)
    opt = inner_optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    algo = make_strategy(model, opt, comm, **cfg.strategy_kwargs())
    return Worker(rank, model, opt, sched, algo)


@torch.no_grad()
def evaluate(eval_model: Llama, algo: Strategy, batches, device: torch.device) -> float:
    """Mean held-out loss of the global parameters θ_g."""
    params = algo.global_parameters()
    for name, p in eval_model.named_parameters():
        p.copy_(params[name])
    eval_model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        with _autocast(device):
            _, loss = eval_model(x.to(device), y.to(device))
        total += float(loss) * x.shape[0]
        count += x.shape[0]
    return total / count


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


class _StopFlag:
    """Ctrl-C sets a flag: once every process knows (through a log step's metrics sum,
    read one log interval later), the loop checkpoints and exits.
    A second Ctrl-C interrupts at once (the last complete checkpoint stays valid)."""

    def __init__(self):
        self.requested = False  # this process saw Ctrl-C
        # all processes know: set when a metrics sum lands, which every process does at
        # the same step with the same sum, so ranks stop together
        self.agreed = False
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


@dataclass
class _PendingRow:
    """A log step's train row whose sum over the processes is still in flight."""

    sums: Future  # of [Σ train loss, Σ Ctrl-C seen, Σ bytes sent], over every worker
    row: dict  # the row, train_loss and bytes_sent_per_worker still None
    after: list[dict] = field(default_factory=list)  # rows logged since, written after it


@dataclass
class Run:
    """Everything one training run holds, on this process."""

    cfg: Config
    group: rendezvous.Group
    device: torch.device
    run_dir: str
    corpus: Corpus
    workers: list[Worker]
    eval_model: Llama
    eval_set: list
    n_params: int
    start: int = 0  # first step to run (after a resume)
    prior_wall: float = 0.0  # wall seconds of the run before the resume
    t_start: float = 0.0
    metrics: IO[str] | None = None  # metrics.jsonl, on rank 0
    trackers: Any = None  # TensorBoard / W&B, on rank 0, when asked for (train.loggers.Trackers)
    bar: Any = None  # the progress bar, on rank 0
    train_loss: float | None = None  # set when a log step's sum lands; the last step always logs
    stop: _StopFlag = field(default_factory=_StopFlag)
    pending: _PendingRow | None = None  # the last log step's row, until its sum lands

    sim_seconds: float = 0.0  # in-process with unequal speeds: the wall clock real workers would take
    # time-budget: in-process, when each local worker's last step ends (in steps of the
    # fastest); under torchrun, its estimate of its next step's time (the last one's,
    # halved after each sync window in which it trained nothing, so that a stale
    # estimate cannot keep it out for good) and budget_t0, the wall-clock time at which
    # step 0's window opened
    budget_clock: list[float] = field(default_factory=list)
    budget_t0: float = 0.0
    budget_trained: list[int] = field(default_factory=list)  # steps trained by the last sync
    logged_exclusions: int = 0  # exclusions / skipped rounds already written to metrics.jsonl
    logged_skips: int = 0
    logged_events: int = 0  # elastic: membership events already written
    plan: dict | None = None  # algo.auto: the plan (RUN/plan.json)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.algo.workers * self.cfg.train.batch_size * self.cfg.model.seq_len

    def tokens_at(self, steps: int) -> int:
        """Tokens all workers have trained on after ``steps`` schedule steps, as the
        schedule plans it (exact but for time-budget under torchrun, where real clocks
        decide; train rows and the summary count what was really trained)."""
        per = self.cfg.train.batch_size * self.cfg.model.seq_len
        return per * sum(trained_steps(v, steps) for v in self.rel_speeds)

    @functools.cached_property
    def speeds(self) -> list[float]:
        """algo.worker_speeds, one per worker (parsed once)."""
        return self.cfg.algo.speeds()

    @functools.cached_property
    def rel_speeds(self) -> list[float]:
        """Each worker's speed relative to the fastest, for the schedule: all 1 in lockstep."""
        if self.cfg.algo.schedule == "lockstep":
            return [1.0] * self.cfg.algo.workers
        return [v / max(self.speeds) for v in self.speeds]

    def trains(self, rank: int, step: int) -> bool:
        """Whether worker ``rank`` trains at schedule step ``step`` (else it sits it out)."""
        a = self.cfg.algo
        if a.schedule == "lockstep":
            return True
        if a.schedule == "steps":
            return trains_at(self.rel_speeds[rank], step)
        # time-budget: train if a step started now ends by the deadline of the next sync
        # (the end of schedule step t is due at t0 + (t + 1)·round_seconds/H); a worker
        # that is free works on without pause and waits only at syncs it is early for
        i, sync = self.group.local_ranks.index(rank), self.next_sync(step)
        if self.group.distributed:  # real clocks; the estimate is the worker's last step
            return time.perf_counter() + self.budget_clock[i] <= self.budget_t0 + (sync + 1) * a.round_seconds / a.inner_steps
        # simulated: clocks in steps of the fastest worker; a step of speed v takes 1/v
        end = self.budget_clock[i] + 1.0 / self.rel_speeds[rank]
        if end > sync + 1 + 1e-9:
            return False
        self.budget_clock[i] = end
        return True

    def next_sync(self, step: int) -> int:
        """The first schedule step ≥ ``step`` (0-based) after which a fragment is sent."""
        algo, t = self.workers[0].algo, step
        while not algo.due_to_send(t + 1):
            t += 1
        return t

    def wall(self) -> float:
        return time.perf_counter() - self.t_start

    def log(self, msg: str) -> None:
        _log_main(self.group, msg)

    def write_row(self, row: dict) -> None:
        """Append ``row`` to metrics.jsonl (rank 0), after a pending log step's row."""
        if self.metrics is None:
            return
        if self.pending is not None:
            self.pending.after.append(row)
            return
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        if self.trackers is not None:
            self.trackers.log(row)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None


def _log_main(group: rendezvous.Group, msg: str) -> None:
    """Progress messages: rank 0 speaks."""
    if group.is_main:
        print(msg, file=sys.stderr, flush=True)


def _run_name(cfg: Config, group: rendezvous.Group) -> str:
    if cfg.train.name:
        return cfg.train.name
    name = f"{cfg.algo.mode}-{cfg.algo.wire_codec}-{time.strftime('%Y%m%d-%H%M%S')}"
    return group.broadcast(name)  # every rank must use rank 0's name


def train(cfg: Config, *, run_dir: str | None = None, resume: bool = False) -> dict:
    """Train per ``cfg``; write the run directory; return the summary.

    ``run_dir`` with ``resume=True`` continues the run saved there.
    """
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        device = _device(cfg)
        if cfg.algo.schedule == "time-budget" and not cfg.algo.round_seconds and rendezvous.launched_by_torchrun():
            raise ConfigError("algo.schedule=time-budget under torchrun needs algo.round_seconds > 0 "
                              "(the wall-clock length of a round of H steps)")
        try:
            if cfg.elastic.enabled:
                e = cfg.elastic
                group = rendezvous.join_elastic(cfg.algo.workers, e.worker, lighthouse=e.lighthouse, timeout_s=e.timeout_s,
                                                connect_timeout_s=e.connect_timeout_s, quorum_timeout_s=e.quorum_timeout_s,
                                                min_workers=e.min_workers, host=e.host)
            else:
                group = rendezvous.join(cfg.algo.workers, device_type=device.type, delay_s=cfg.train.exchange_delay_s)
        except (ValueError, ImportError) as e:
            raise ConfigError(str(e)) from None
        try:
            run = build(cfg, group, device, run_dir, resume=resume)
            try:
                if group.elastic and ckpt.latest_step(run.run_dir) is not None:
                    resume = True  # a restarted worker: its inner optimizer and data position
                if resume:
                    restore(run)
                else:
                    _fresh_metrics(run)
                return _loop(run)
            finally:
                run.close()
        finally:
            group.close()
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def build(cfg: Config, group: rendezvous.Group, device: torch.device, run_dir: str | None, *,
          resume: bool = False) -> Run:
    """Run directory and resolved config (with ``algo.auto``, the plan: a resumed run keeps
    its own), corpus, the local workers, the eval model."""
    if run_dir is None:
        run_dir = os.path.join(cfg.train.run_dir, _run_name(cfg, group))
        if group.elastic:  # every worker keeps its own files (it may have no disk in common with the others)
            run_dir = os.path.join(run_dir, f"worker-{group.rank}")
    if group.is_main:
        os.makedirs(run_dir, exist_ok=True)
    corpus = Corpus.build(cfg.data, log=lambda m: _log_main(group, m))
    plan = None
    if cfg.algo.auto:  # measure the link and the step time, choose H, P, τ and the codec
        from farsync.plan.run import plan_run

        rank = group.local_ranks[0]
        x, y = corpus.worker_batch(rank, cfg.algo.workers, 0, cfg.train.batch_size, cfg.model.seq_len, cfg.train.seed)
        try:
            cfg, plan = plan_run(cfg, group, build_model(cfg, corpus.vocab_size, device), (x.to(device), y.to(device)),
                                 run_dir, lambda m: _log_main(group, m), keep=resume)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if group.is_main:
        with open(os.path.join(run_dir, "config.toml"), "w") as f:
            f.write(to_toml(cfg))
    comms = list(group.comms)
    if cfg.train.fault and cfg.train.faulty_worker in group.local_ranks:  # fault injection (test/benchmark)
        i = group.local_ranks.index(cfg.train.faulty_worker)
        comms[i] = FaultyCommunicator(comms[i], *parse_fault(cfg.train.fault))
    workers = [build_worker(cfg, r, c, corpus.vocab_size, device) for r, c in zip(group.local_ranks, comms)]
    run = Run(cfg, group, device, run_dir, corpus, workers,
              eval_model=build_model(cfg, corpus.vocab_size, device),
              eval_set=corpus.eval_batches(cfg.train.batch_size, cfg.model.seq_len, cfg.train.eval_batches),
              n_params=workers[0].model.num_parameters(), plan=plan)
    a, algo = cfg.algo, workers[0].algo
    run.log(f"model: {model_name(cfg, workers[0].model)}, {run.n_params:,} parameters ({workers[0].model.num_parameters(non_embedding=True):,} "
            f"non-embedding); {a.workers} workers, mode {a.mode}" + (
                f", H={a.inner_steps}, P={algo.num_fragments}, τ={algo.sync_delay}, α={algo.mixing}, codec {a.codec}"
                if a.mode != "dp" else ""))
    return run


def _metrics_path(run: Run) -> str:
    return os.path.join(run.run_dir, "metrics.jsonl")


def _fresh_metrics(run: Run) -> None:
    if run.group.is_main and os.path.exists(_metrics_path(run)):
        os.unlink(_metrics_path(run))


def restore(run: Run) -> None:
    """Load the latest complete checkpoint into every local worker; drop metrics rows
    past it (but for an elastic worker's)."""
    step = ckpt.latest_step(run.run_dir)
    if step is None:
        raise ConfigError(f"--resume {run.run_dir}: no checkpoint found there")
    for w in run.workers:
        state = ckpt.load_worker(run.run_dir, step, w.rank, map_location=run.device)
        w.model.load_state_dict(state["model"])
        w.optimizer.load_state_dict(state["optimizer"])
        w.scheduler.load_state_dict(state["scheduler"])
        w.algo.load_state_dict(state["algo"])
        run.prior_wall = state["wall_seconds"]
    run.start = step
    path = _metrics_path(run)
    # an elastic worker keeps its rows: it rejoins the others where they are, and the syncs
    # it took part in after this checkpoint happened (a resume redoes them)
    if run.group.is_main and os.path.exists(path) and not run.group.elastic:
        with open(path) as f:
            rows = [r for r in f if json.loads(r)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(rows)
    algo = run.workers[0].algo  # exclusions before the resume are in metrics.jsonl already
    run.logged_exclusions = len(getattr(algo, "exclusions", []))
    run.logged_skips = len(getattr(algo, "skipped_rounds", []))
    run.log(f"resumed {run.run_dir} at step {step}")


def _loop(run: Run) -> dict:
    cfg = run.cfg
    if run.group.is_main:
        run.metrics = open(_metrics_path(run), "a")
        if cfg.train.tensorboard or cfg.train.wandb:
            from farsync.train.loggers import Trackers

            run.trackers = Trackers(run.run_dir, os.path.basename(os.path.normpath(run.run_dir)), dataclasses.asdict(cfg),
                                    tensorboard=cfg.train.tensorboard, wandb=cfg.train.wandb)
        if cfg.train.progress:
            from tqdm import tqdm

            run.bar = tqdm(total=cfg.train.steps, initial=run.start, unit="step", dynamic_ncols=True, file=sys.stderr)
    run.t_start = time.perf_counter() - run.prior_wall
    a = cfg.algo
    if a.schedule == "time-budget":
        run.budget_clock = [0.0 if run.group.distributed else float(run.start)] * len(run.workers)
        run.budget_trained = [w.algo.stats.inner_steps for w in run.workers]
        run.budget_t0 = time.perf_counter() - run.start * a.round_seconds / a.inner_steps
    if run.group.elastic:
        elastic_start(run)
    with run.stop:
        step = run.start
        while step < cfg.train.steps:
            try:
                train_step(run, step)
            except Rejoined as r:  # the others went on without this worker: continue from their state
                rejoin(run, r)
                step = run.start
                continue
            done = step + 1
            step = done
            last = done == cfg.train.steps
            if done % cfg.train.log_every == 0 or last:
                log_step(run, done)
            if done % cfg.train.eval_every == 0 and not last:
                run.write_row({"kind": "eval", "step": done, "tokens": run.tokens_at(done),
                               "eval_loss": eval_loss(run), "wall_seconds": run.wall()})
            if run.bar is not None:
                run.bar.update(1)
            if last:
                break
            if run.stop.agreed or (cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0):
                save(run, done)  # lands the pending metrics first, which may agree a stop
            if run.stop.agreed:
                run.close()
                run.log(f"stopped at step {done}; checkpoint saved. Resume with: farsync train --resume {run.run_dir}")
                return {"stopped_at": done, "run_dir": run.run_dir}
    return finish(run)


def elastic_start(run: Run) -> None:
    """An elastic worker's start: hand the communicator what a joining peer needs (see
    :meth:`~farsync.algorithms.diloco.DiLoCo.shared_state`), then join the live workers —
    all of them at once at the start of a run, or the others mid-run (:func:`rejoin`)."""
    comm, algo = run.group.comms[0], run.workers[0].algo
    comm.state_fn = algo.shared_state
    comm.settings = (algo.codec, algo.exchange, algo.aggregation)
    if run.cfg.train.die_at_step:
        comm.die_in_round = run.cfg.train.die_at_step
        comm.die_signal = getattr(signal, run.cfg.train.die_signal)
    r = comm.join(run.cfg.algo.workers, run.cfg.elastic.join_timeout_s, step=algo.step_count)
    if r is not None:
        rejoin(run, r)
    log_syncs(run)


def rejoin(run: Run, r: Rejoined) -> None:
    """Continue from a live worker's state: θ_g, outer optimizers and schedule position
    from it, the sync it was in landed here too; the learning rate follows the schedule
    step. What this worker trained since its last sync is dropped (at most one round of
    its work); its inner optimizer state is its own (from its last local checkpoint, or
    fresh)."""
    w = run.workers[0]
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
    run.start = s
    if run.bar is not None:
        run.bar.n = s
    state_bytes = sum(t.numel() * t.element_size() for t in _tensors(r.state))
    run.write_row({"kind": "rejoined", "step": s, "from_step": lost, "behind_syncs": r.behind, "state_bytes": state_bytes,
                   "time": time.time(), "wall_seconds": run.wall()})
    run.log(f"joined the live workers at step {s} ({r.behind} syncs behind; this worker was at step {lost})")
    log_syncs(run)


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


def trained_steps(rel_speed: float, steps: int) -> int:
    """Steps a worker of ``rel_speed`` (≤ 1, relative to the fastest) trains among the
    first ``steps`` schedule steps: ⌈steps·v⌉, spread evenly, the first one included
    (the learning-rate schedule follows schedule steps, for every worker alike)."""
    return math.ceil(steps * rel_speed - 1e-9)


def trains_at(rel_speed: float, step: int) -> bool:
    """Whether a worker of ``rel_speed`` trains at schedule step ``step`` (0-based)."""
    return trained_steps(rel_speed, step + 1) > trained_steps(rel_speed, step)


def train_step(run: Run, step: int) -> None:
    """Forward/backward of every local worker, then the strategy's phases in lock step.

    Compute time is measured here and added to each worker's stats: its own forward and
    backward, plus an even share of the phases' time minus the time they were blocked
    (which the strategies record themselves).

    Unequal speeds (algo.worker_speeds): with schedule ``steps`` or ``time-budget`` a
    slower worker trains only some steps (:meth:`Run.trains`) and sits the others out;
    its data continues where it left off. Under torchrun a worker of relative speed v < 1 sleeps
    (1/v − 1) × its compute after each step it trains (a documented slowdown); in one
    process nothing sleeps and ``run.sim_seconds`` adds what the step would take on
    real workers: the mean compute of the workers training, × fastest/slowest speed in
    lockstep (everyone waits for the slowest), × 1 otherwise."""
    cfg, M = run.cfg, run.cfg.algo.workers
    speeds = run.speeds
    active, tokens, spent = [], [], []
    for w in run.workers:
        on = run.trains(w.rank, step)
        active.append(on)
        tokens.append(cfg.train.batch_size * cfg.model.seq_len if on else 0)
        if not on:
            continue
        t0 = time.perf_counter()
        index = getattr(w.algo, "steps_trained", step)  # a slower worker's data continues where it stopped
        x, y = run.corpus.worker_batch(w.rank, M, index, cfg.train.batch_size, cfg.model.seq_len, cfg.train.seed)
        with _autocast(run.device):
            _, loss = w.model(x.to(run.device), y.to(run.device))
        loss.backward()
        w.last_loss = loss.item()
        if cfg.train.die_at_step and step + 1 == cfg.train.die_at_step and not w.algo.due_to_send(step + 1):
            os.kill(os.getpid(), getattr(signal, cfg.train.die_signal))  # test hook: a worker lost mid-round
        dt = time.perf_counter() - t0
        spent.append(dt)
        slowdown = max(speeds) / speeds[w.rank] - 1.0
        if run.group.distributed and slowdown > 0:
            time.sleep(dt * slowdown)
            dt *= 1.0 + slowdown
        w.algo.stats.add_compute(dt)
        if run.budget_clock and run.group.distributed:
            run.budget_clock[run.workers.index(w)] = dt
    if not run.group.distributed and len(set(speeds)) > 1 and spent:
        per = sum(spent) / len(spent)
        run.sim_seconds += per * (max(speeds) / min(speeds) if cfg.algo.schedule == "lockstep" else 1.0)
    if cfg.algo.schedule == "time-budget" and run.workers[0].algo.due_to_send(step + 1):  # a sync follows this step
        if run.group.distributed:
            # a worker early for the sync waits for its deadline: a round lasts round_seconds
            ahead = run.budget_t0 + (step + 1) * cfg.algo.round_seconds / cfg.algo.inner_steps - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
            for i, w in enumerate(run.workers):
                if w.algo.stats.inner_steps == run.budget_trained[i]:
                    run.budget_clock[i] /= 2  # nothing trained this window
                run.budget_trained[i] = w.algo.stats.inner_steps
        else:
            run.budget_clock = [max(c, step + 1.0) for c in run.budget_clock]

    def clip(algo: Strategy) -> None:
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(algo.model.parameters(), cfg.optim.grad_clip)

    blocked_before = sum(w.algo.stats.blocked_seconds for w in run.workers)
    t0 = time.perf_counter()
    step_in_lockstep([w.algo for w in run.workers], before_inner_step=clip, tokens=tokens, active=active)
    log_syncs(run)
    blocked = sum(w.algo.stats.blocked_seconds for w in run.workers) - blocked_before
    share = max(0.0, time.perf_counter() - t0 - blocked) / len(run.workers)
    for w, on in zip(run.workers, active):
        w.algo.stats.add_compute(share)  # inner steps and in-process exchange arithmetic
        with warnings.catch_warnings():
            if not on:  # the learning rate follows schedule steps, also those a worker sits out
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            w.scheduler.step()
        w.optimizer.zero_grad(set_to_none=True)


def log_syncs(run: Run) -> None:
    """Every sync landed (who contributed, sat out, was left out), and new exclusions and
    skipped rounds (every worker sees the same): a metrics row each; a line on stderr
    for an exclusion or a skipped round."""
    algo = run.workers[0].algo
    for w in run.workers[1:]:
        if hasattr(w.algo, "drain_syncs"):
            w.algo.drain_syncs()  # the same syncs as worker 0's
    for sync in algo.drain_syncs() if hasattr(algo, "drain_syncs") else []:
        if run.group.elastic:
            sync["time"] = time.time()  # when it landed here (membership events carry the same clock)
        run.write_row({"kind": "sync", **sync})
    excl, skips = getattr(algo, "exclusions", []), getattr(algo, "skipped_rounds", [])
    for e in excl[run.logged_exclusions:]:
        run.write_row({"kind": "excluded", **e})
        run.log(f"left out worker {e['worker']}'s pseudo-gradient, fragment {e['fragment']} round {e['round']} "
                f"(step {e['step']}): {e['why']}")
    for k in skips[run.logged_skips:]:
        run.write_row({"kind": "skipped", **k})
        run.log(f"skipped round {k['round']} of fragment {k['fragment']} (step {k['step']}): only workers "
                f"{k['kept']} left, fewer than algo.min_contributions; θ_g unchanged")
    run.logged_exclusions, run.logged_skips = len(excl), len(skips)
    if run.group.elastic:  # membership changes and retried rounds, as this worker saw them
        events = run.group.comms[0].events
        for e in events[run.logged_events:]:
            run.write_row({"kind": "membership", "step": algo.step_count, **e})
            if e["event"] == "members":
                run.log(f"workers now {e['workers']} (lost {e['lost']}, joined {e['joined']})")
            elif e["event"] == "retry":
                run.log(f"sync {e['round']} failed ({e['why']}); retrying with the workers alive")
        run.logged_events = len(events)


def log_step(run: Run, done: int) -> None:
    """A metrics row (losses and bytes summed over every worker, and whether any process
    saw Ctrl-C): lands the previous log step's sum, a log interval old and so normally
    done, then starts this step's. Its row is written when it lands."""
    land_metrics(run)
    workers = run.workers
    local = [sum(w.last_loss for w in workers), float(run.stop.requested), float(sum(w.algo.stats.total_bytes for w in workers)),
             float(sum(w.algo.stats.tokens for w in workers))]
    st = workers[0].algo.stats
    row = {
        "kind": "train", "step": done, "tokens": run.tokens_at(done), "train_loss": None,
        "lr": workers[0].scheduler.get_last_lr()[0], "wall_seconds": run.wall(),
        "bytes_sent_per_worker": None, "dp_bytes_per_worker": done * dp_bytes_per_step(run.cfg.algo.workers, st.num_parameters),
        "sync_events": st.sync_events,
    }
    run.pending = _PendingRow(run.group.all_sum_async(local), row)


def land_metrics(run: Run) -> None:
    """Wait for the pending log step's sum; write its row, then the rows logged behind it.
    Every process lands the same sum at the same step, so a Ctrl-C it carries is agreed
    at the same step everywhere."""
    p, run.pending = run.pending, None
    if p is None:
        return
    total = p.sums.result()
    M = run.group.summed_workers
    run.train_loss = total[0] / M
    if total[1] > 0:
        run.stop.agreed = True
    p.row.update(train_loss=run.train_loss, bytes_sent_per_worker=total[2] / M, tokens=int(total[3]))
    for row in (p.row, *p.after):
        run.write_row(row)
    if run.bar is not None:
        r = p.row
        run.bar.set_postfix(loss=f"{run.train_loss:.3f}", tok_s=f"{r['tokens'] / max(r['wall_seconds'], 1e-9):,.0f}",
                            sent=format_bytes(r["bytes_sent_per_worker"]), refresh=False)


def eval_loss(run: Run) -> float:
    return evaluate(run.eval_model, run.workers[0].algo, run.eval_set, run.device)


def save(run: Run, step: int) -> None:
    """Every local worker's checkpoint; rank 0 commits it once all files exist. The
    pending metrics land first: a resume from here finds every row up to ``step``."""
    land_metrics(run)
    for w in run.workers:
        ckpt.save_worker(run.run_dir, step, w.rank, {
            "model": w.model.state_dict(), "optimizer": w.optimizer.state_dict(),
            "scheduler": w.scheduler.state_dict(), "algo": w.algo.state_dict(),
            "step": step, "wall_seconds": run.wall(),
        })
    run.group.barrier()
    if run.group.is_main:
        ckpt.commit(run.run_dir, step, run.cfg.algo.workers, run.group.local_ranks if run.group.elastic else None)


def finish(run: Run) -> dict:
    """Land what is in flight, evaluate θ_g, checkpoint, write summary and plots."""
    steps = run.cfg.train.steps
    if run.bar is not None:
        run.bar.close()
        run.bar = None
    try:
        finish_in_lockstep([w.algo for w in run.workers])
    except Rejoined as r:  # elastic: the others landed the final syncs without this worker
        raise ElasticError(f"this worker fell behind the others in the final syncs (at step {r.state['step']}); "
                           "they hold the final θ_g, this worker's run directory does not") from None
    log_syncs(run)
    final_eval = eval_loss(run)
    land_metrics(run)  # the last step's row and train loss (the last step always logs)
    run.write_row({"kind": "eval", "step": steps, "tokens": run.tokens_at(steps),
                   "eval_loss": final_eval, "wall_seconds": run.wall()})
    save(run, steps)
    summary = _summary(run, final_eval)
    run.group.barrier()  # every worker is past the last collective before any tears down
    run.close()
    if run.group.is_main:
        with open(os.path.join(run.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        from farsync.train.plots import plot_run

        plot_run(run.run_dir)
    return summary


def _summary(run: Run, final_eval: float) -> dict:
    cfg, wall_s = run.cfg, run.wall()
    per_worker = [w.algo.stats.to_dict() for w in run.workers]
    if run.group.distributed:
        per_worker = run.group.gather(per_worker[0])
    sent = [s["total_bytes"] for s in per_worker]
    dp = max(s["dp_equivalent_bytes"] for s in per_worker)  # the workers that trained every step
    compute = sum(s["compute_seconds"] for s in per_worker)
    blocked = sum(s["blocked_seconds"] for s in per_worker)
    tokens = sum(s["tokens"] for s in per_worker)
    return {
        "run_dir": run.run_dir,
        "mode": cfg.algo.mode,
        "workers": cfg.algo.workers,
        "backend": "elastic (torchft)" if run.group.elastic else "torch.distributed" if run.group.distributed else "in-process",
        "model": model_name(cfg, run.workers[0].model),
        "parameters": run.n_params,
        "steps": cfg.train.steps,
        "tokens": tokens,
        "wall_seconds": wall_s,
        "tokens_per_second": tokens / wall_s if wall_s > 0 else None,
        "final_eval_loss": final_eval,
        "final_train_loss": run.train_loss,
        "codec": cfg.algo.wire_codec,
        "bytes_sent_per_worker": sent,
        "bytes_sent_total": sum(sent),
        "dp_equivalent_bytes_per_worker": dp,
        "dp_bytes_ratio": dp / max(sent) if max(sent) else None,
        "peak_bytes_per_sync": max(s["peak_event_bytes"] for s in per_worker),
        "sync_events": per_worker[0]["sync_events"],
        "compute_seconds": compute,
        "blocked_seconds": blocked,
        "compute_utilization": compute / (compute + blocked) if compute + blocked > 0 else 1.0,
        "worker_speeds": run.speeds,
        "schedule": cfg.algo.schedule,
        # in-process with unequal speeds: the wall clock real workers of those speeds would take
        "simulated_wall_seconds": run.sim_seconds if run.sim_seconds else None,
        "per_worker": [
            {k: s[k] for k in ("tokens", "inner_steps", "idle_steps", "rounds_joined", "rounds_sat_out",
                               "rounds_excluded", "rounds_skipped", "total_bytes", "compute_seconds", "blocked_seconds")}
            for s in per_worker
        ],
        "exclusions": getattr(run.workers[0].algo, "exclusions", []),
        "skipped_rounds": getattr(run.workers[0].algo, "skipped_rounds", []),
        # elastic: what this worker saw of failures (every event is a metrics.jsonl row)
        "elastic": _elastic_counts(run.group.comms[0].events) if run.group.elastic else None,
        # algo.auto: what was chosen and predicted (measured figures beside it above; all in plan.json)
        "plan": None if run.plan is None else {
            "chosen": run.plan["chosen_label"], "target_utilization": run.plan["target_utilization"],
            "predicted_utilization": run.plan["predicted_utilization"],
            "predicted_dp_bytes_ratio": run.plan["predicted_dp_bytes_ratio"],
            "measured_mbit": run.plan["link"]["measured_mbit"], "rtt_ms": run.plan["link"]["rtt_ms"],
            "link_given": run.plan["link"]["given"], "step_time_s": run.plan["step_time_s"]["used"]},
    }


def _elastic_counts(events: list[dict]) -> dict:
    """Syncs retried, workers lost and joined, and this worker's heals."""
    members = [e for e in events if e["event"] == "members"]
    return {"syncs_retried": len({tuple(e["round"] or ()) for e in events if e["event"] == "retry"}),
            "workers_lost": sum(len(e["lost"]) for e in members),
            "workers_joined": sum(len(e["joined"]) for e in members),
            "healed": sum(1 for e in events if e["event"] == "healed")}
