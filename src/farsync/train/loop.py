"""The training loop: one loop for DP, DiLoCo and Streaming DiLoCo.

A process drives a list of *local workers*: all M of them in lock step when simulating
in one process, or just its own under ``torchrun`` (one process per worker). Either
way each step is: every local worker runs forward/backward on its own batch, then
:func:`~farsync.algorithms.step_in_lockstep` runs the algorithm's phases (gradient mean
for DP, inner step, fragment exchanges and outer steps when due).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from farsync.algorithms import DiLoCo, step_in_lockstep
from farsync.algorithms.accounting import format_bytes
from farsync.comm import InProcessGroup
from farsync.comm.base import Communicator
from farsync.data import Corpus
from farsync.models import Llama, model_config
from farsync.train import checkpoint as ckpt
from farsync.train.config import Config, ConfigError, to_toml


@dataclass
class Worker:
    rank: int
    model: Llama
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    algo: DiLoCo
    last_loss: float = math.nan


@dataclass
class RunContext:
    """Where this process stands: which workers it drives and how it talks to others."""

    rank: int  # process rank (0 when simulating in-process)
    distributed: bool
    device: torch.device
    comms: list[Communicator] = field(default_factory=list)
    local_ranks: list[int] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, msg: str) -> None:
        if self.is_main:
            print(msg, file=sys.stderr, flush=True)


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
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def make_context(cfg: Config) -> RunContext:
    """In-process simulation of M workers, or one worker per process under torchrun."""
    device = _device(cfg)
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        import torch.distributed as dist

        from farsync.comm import TorchDistributedCommunicator

        world = int(os.environ["WORLD_SIZE"])
        if world != cfg.algo.workers:
            raise ConfigError(
                f"algo.workers = {cfg.algo.workers} but torchrun started {world} processes; "
                f"set --algo.workers={world} or --nproc-per-node/--nnodes to match"
            )
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank = dist.get_rank()
        comm = TorchDistributedCommunicator(delay_s=cfg.train.exchange_delay_s)
        return RunContext(rank, True, device, [comm], [rank])
    group = InProcessGroup(cfg.algo.workers, delay_s=cfg.train.exchange_delay_s)
    return RunContext(0, False, device, group.communicators(), list(range(cfg.algo.workers)))


def build_model(cfg: Config, vocab_size: int, device: torch.device) -> Llama:
    torch.manual_seed(cfg.train.seed)  # every worker starts from the same θ_g
    mcfg = model_config(cfg.model.size, vocab_size, cfg.model.seq_len, z_loss=cfg.model.z_loss,
                        qk_norm=cfg.model.qk_norm)
    return Llama(mcfg).to(device)


def build_worker(cfg: Config, rank: int, comm: Communicator, vocab_size: int, device: torch.device) -> Worker:
    model = build_model(cfg, vocab_size, device)
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    algo = DiLoCo(model, opt, comm, **cfg.algo_kwargs())
    return Worker(rank, model, opt, sched, algo)


@torch.no_grad()
def evaluate(eval_model: Llama, algo: DiLoCo, batches, device: torch.device) -> float:
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
    """Ctrl-C sets a flag: the loop checkpoints at the next step boundary and exits.
    A second Ctrl-C interrupts at once (the last complete checkpoint stays valid)."""

    def __init__(self):
        self.requested = False  # this process saw Ctrl-C
        self.agreed = False  # all processes know; set at a log step, so ranks stop together
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


def _run_name(cfg: Config, ctx: RunContext) -> str:
    if cfg.train.name:
        return cfg.train.name
    name = f"{cfg.algo.mode}-{cfg.algo.codec if cfg.algo.mode != 'dp' else 'fp32'}-{time.strftime('%Y%m%d-%H%M%S')}"
    if ctx.distributed:  # every rank must use rank 0's name
        import torch.distributed as dist

        box = [name]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
    return name


def train(cfg: Config, *, run_dir: str | None = None, resume: bool = False) -> dict:
    """Train per ``cfg``; write the run directory; return the summary.

    ``run_dir`` with ``resume=True`` continues the run saved there.
    """
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        ctx = make_context(cfg)
        try:
            return _train(cfg, ctx, run_dir, resume)
        finally:
            for c in ctx.comms:
                c.close()
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _train(cfg: Config, ctx: RunContext, run_dir: str | None, resume: bool) -> dict:
    if run_dir is None:
        run_dir = os.path.join(cfg.train.run_dir, _run_name(cfg, ctx))
    if ctx.is_main:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.toml"), "w") as f:
            f.write(to_toml(cfg))
    corpus = Corpus.build(cfg.data, log=ctx.log)
    M, B, T = cfg.algo.workers, cfg.train.batch_size, cfg.model.seq_len
    workers = [build_worker(cfg, r, c, corpus.vocab_size, ctx.device) for r, c in zip(ctx.local_ranks, ctx.comms)]
    if not ctx.distributed:
        for w in workers:  # the loop measures compute per simulated worker itself
            w.algo.auto_time = False
    eval_model = build_model(cfg, corpus.vocab_size, ctx.device)
    eval_set = corpus.eval_batches(B, T, cfg.train.eval_batches)
    n_params = workers[0].model.num_parameters()
    ctx.log(f"model: {cfg.model.size}, {n_params:,} parameters ({workers[0].model.num_parameters(non_embedding=True):,} "
            f"non-embedding); {M} workers, mode {cfg.algo.mode}" + (
                f", H={cfg.algo.sync_every}, P={workers[0].algo.num_fragments}, τ={workers[0].algo.sync_delay}, "
                f"α={workers[0].algo.mixing}, codec {cfg.algo.codec}" if cfg.algo.mode != "dp" else ""))

    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    start, prior_wall = 0, 0.0
    if resume:
        step = ckpt.latest_step(run_dir)
        if step is None:
            raise ConfigError(f"--resume {run_dir}: no checkpoint found there")
        for w in workers:
            state = ckpt.load_worker(run_dir, step, w.rank, map_location=ctx.device)
            w.model.load_state_dict(state["model"])
            w.optimizer.load_state_dict(state["optimizer"])
            w.scheduler.load_state_dict(state["scheduler"])
            w.algo.load_state_dict(state["algo"])
            prior_wall = state["wall_seconds"]
        start = step
        if ctx.is_main and os.path.exists(metrics_path):  # drop rows past the checkpoint
            with open(metrics_path) as f:
                rows = [r for r in f if json.loads(r)["step"] <= step]
            with open(metrics_path, "w") as f:
                f.writelines(rows)
        ctx.log(f"resumed {run_dir} at step {step}")
    elif ctx.is_main and os.path.exists(metrics_path):
        os.unlink(metrics_path)

    metrics = open(metrics_path, "a") if ctx.is_main else None
    tokens_per_step = M * B * T
    bar = None
    if ctx.is_main and cfg.train.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)

    t_start = time.perf_counter() - prior_wall

    def wall() -> float:
        return time.perf_counter() - t_start

    def log_row(row: dict) -> None:
        if metrics is not None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    def save(step: int) -> None:
        for w in workers:
            ckpt.save_worker(run_dir, step, w.rank, {
                "model": w.model.state_dict(), "optimizer": w.optimizer.state_dict(),
                "scheduler": w.scheduler.state_dict(), "algo": w.algo.state_dict(),
                "step": step, "wall_seconds": wall(),
            })
        if ctx.distributed:
            import torch.distributed as dist

            dist.barrier()
        if ctx.is_main:
            ckpt.commit(run_dir, step, M)

    def eval_loss() -> float:
        return evaluate(eval_model, workers[0].algo, eval_set, ctx.device)

    def clip(algo: DiLoCo) -> None:
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(algo.model.parameters(), cfg.optim.grad_clip)

    stopped = False
    train_loss = None  # set at every log step, and the last step always logs
    step = start
    with _StopFlag() as stop:
        for step in range(start, cfg.train.steps):
            for w in workers:
                t0 = time.perf_counter()
                x, y = corpus.worker_batch(w.rank, M, step, B, T, cfg.train.seed)
                with _autocast(ctx.device):
                    _, loss = w.model(x.to(ctx.device), y.to(ctx.device))
                loss.backward()
                w.last_loss = loss.item()
                if not ctx.distributed:
                    w.algo.stats.compute_seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            step_in_lockstep([w.algo for w in workers], before_inner_step=clip)
            if not ctx.distributed:
                # inner steps and in-process exchange arithmetic, shared evenly
                share = (time.perf_counter() - t0) / len(workers)
                for w in workers:
                    w.algo.stats.compute_seconds += share
            for w in workers:
                w.scheduler.step()
                w.optimizer.zero_grad(set_to_none=True)
            done = step + 1
            last = done == cfg.train.steps

            if done % cfg.train.log_every == 0 or last:
                losses = [w.last_loss for w in workers]
                sent = [w.algo.stats.total_bytes for w in workers]
                local = [sum(losses), float(stop.requested), float(sum(sent))]
                total = ctx.comms[0].all_sum_floats(local) if ctx.distributed else local
                train_loss = total[0] / M
                stop.agreed = total[1] > 0  # any rank's Ctrl-C stops them all, at the same step
                st = workers[0].algo.stats
                row = {
                    "kind": "train", "step": done, "tokens": done * tokens_per_step, "train_loss": train_loss,
                    "lr": workers[0].scheduler.get_last_lr()[0], "wall_seconds": wall(),
                    "bytes_sent_per_worker": total[2] / M, "dp_bytes_per_worker": st.dp_equivalent_bytes,
                    "sync_events": st.sync_events,
                }
                log_row(row)
                if bar is not None:
                    bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{done * tokens_per_step / max(wall(), 1e-9):,.0f}",
                                    sent=format_bytes(row["bytes_sent_per_worker"]), refresh=False)
            if done % cfg.train.eval_every == 0 and not last:
                log_row({"kind": "eval", "step": done, "tokens": done * tokens_per_step,
                         "eval_loss": eval_loss(), "wall_seconds": wall()})
            if bar is not None:
                bar.update(1)
            if stop.agreed and not last:
                save(done)
                stopped = True
                break
            if cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0 and not last:
                save(done)

    if bar is not None:
        bar.close()
    if stopped:
        if metrics is not None:
            metrics.close()
        ctx.log(f"stopped at step {step + 1}; checkpoint saved. Resume with: farsync train --resume {run_dir}")
        return {"stopped_at": step + 1, "run_dir": run_dir}

    for w in workers:
        w.algo.finish()  # land fragments still in flight
    final_eval = eval_loss()
    log_row({"kind": "eval", "step": cfg.train.steps, "tokens": cfg.train.steps * tokens_per_step,
             "eval_loss": final_eval, "wall_seconds": wall()})
    save(cfg.train.steps)
    summary = _summary(cfg, ctx, workers, run_dir, final_eval, train_loss, wall(), n_params, tokens_per_step)
    if metrics is not None:
        metrics.close()
    if ctx.is_main:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        from farsync.train.plots import plot_run

        plot_run(run_dir)
    return summary


def _summary(cfg, ctx, workers, run_dir, final_eval, final_train, wall_s, n_params, tokens_per_step) -> dict:
    per_worker = [w.algo.stats.to_dict() for w in workers]
    if ctx.distributed:
        import torch.distributed as dist

        gathered: list = [None] * cfg.algo.workers
        dist.all_gather_object(gathered, per_worker[0])
        per_worker = gathered
    sent = [s["total_bytes"] for s in per_worker]
    dp = per_worker[0]["dp_equivalent_bytes"]
    compute = sum(s["compute_seconds"] for s in per_worker)
    blocked = sum(s["blocked_seconds"] for s in per_worker)
    tokens = cfg.train.steps * tokens_per_step
    return {
        "run_dir": run_dir,
        "mode": cfg.algo.mode,
        "workers": cfg.algo.workers,
        "backend": "torch.distributed" if ctx.distributed else "in-process",
        "model": cfg.model.size,
        "parameters": n_params,
        "steps": cfg.train.steps,
        "tokens": tokens,
        "wall_seconds": wall_s,
        "tokens_per_second": tokens / wall_s if wall_s > 0 else None,
        "final_eval_loss": final_eval,
        "final_train_loss": final_train,
        "codec": cfg.algo.codec if cfg.algo.mode != "dp" else "fp32",
        "bytes_sent_per_worker": sent,
        "bytes_sent_total": sum(sent),
        "dp_equivalent_bytes_per_worker": dp,
        "dp_bytes_ratio": dp / max(sent) if max(sent) else None,
        "peak_bytes_per_sync": max(s["peak_event_bytes"] for s in per_worker),
        "sync_events": per_worker[0]["sync_events"],
        "compute_seconds": compute,
        "blocked_seconds": blocked,
        "compute_utilization": compute / (compute + blocked) if compute + blocked > 0 else 1.0,
    }

