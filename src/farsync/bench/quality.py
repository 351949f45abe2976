"""The quality benchmark: does Streaming DiLoCo reach data-parallel's loss while sending
two to three orders of magnitude fewer bytes? (Streaming DiLoCo, arXiv 2501.18512: 1B
model, H = 100, loss 2.66 vs 2.67 for DP with 400× fewer bytes.)

Every run trains the same model on the same data with the same per-worker batch B, steps
and seed, so every method of a table sees the same tokens. DP averages the M workers'
gradients every step (a global batch of M·B); the others exchange pseudo-gradients.

The plan has three stages:

1. **Tuning**, at M = ``workers[0]``, with the same number of runs for each family: DP
   over its learning rate (``dp_lrs``); DiLoCo and Streaming DiLoCo (P fragments, τ = 0)
   over outer lr × H (``outer_lrs`` × ``sync_everys``), their inner AdamW lr fixed at
   ``inner_lr``. The best of a family is the run with the lowest final eval loss.
2. **Tables**, one per M in ``workers``: DP, DiLoCo, Streaming (τ = 0), and Streaming +
   overlap (τ = ``overlap_delay``) with fp32, fp4-e3m0, fp4-e2m1 and int8
   pseudo-gradients. Overlap and codec variants reuse Streaming's tuned (outer lr, H);
   every M reuses what was tuned at ``workers[0]``.
3. **Size study**, at M = ``workers[0]``: DP vs Streaming + overlap + fp4-e3m0 at each of
   ``sizes``, with the hyperparameters tuned at ``size``.

A configuration several stages share is trained once. Runs go to a pool of ``jobs``
processes with one torch thread each: on a 2-core machine two single-thread runs side by
side get more done than one run on two threads (small matmuls scale poorly).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import math
import multiprocessing
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace

Log = Callable[[str], None]


@dataclass(frozen=True)
class QualitySpec:
    """What the benchmark trains. Defaults: the full benchmark on the 2-core CPU box."""

    size: str = "tiny"
    """Model size of the tables and the tuning (models.MODEL_SIZES)."""
    seq_len: int = 128
    """Tokens per sequence (T)."""
    batch_size: int = 8
    """Sequences per worker per step (B); DP's global batch is M·B."""
    steps: int = 160
    """Inner steps per worker, for every run."""
    warmup_steps: int = 16
    """Linear warmup of the inner lr (then cosine decay to 10 %)."""
    eval_every: int = 20
    """Evaluate the global model every this many steps (and at the end)."""
    eval_batches: int = 16
    """Held-out batches of B sequences per evaluation; the same for every run."""
    log_every: int = 5
    """metrics.jsonl train rows (bytes so far); must divide eval_every."""
    workers: tuple[int, ...] = (4, 2)
    """M of each table; the first is the default table, tuning and size study."""
    fragments: int = 2
    """P: Streaming DiLoCo's fragments (strided)."""
    overlap_delay: int = 1
    """τ of the overlap variants."""
    inner_lr: float = 3e-3
    """Inner AdamW lr of DiLoCo and Streaming DiLoCo (not tuned)."""
    dp_lrs: tuple[float, ...] = (1.5e-3, 3e-3, 6e-3, 1.2e-2)
    """DP learning rates tried; as many as outer_lrs × sync_everys."""
    outer_lrs: tuple[float, ...] = (0.4, 0.7)
    """Outer Nesterov-SGD learning rates tried (momentum 0.9)."""
    sync_everys: tuple[int, ...] = (20, 40)
    """H values tried."""
    sizes: tuple[str, ...] = ("nano", "tiny", "mini")
    """Model sizes of the size study."""
    seed: int = 0
    """Seed of model init and data order, for every run."""
    runtime_limit_s: float = 1800.0
    """The runtime target this configuration is held to (reported, not enforced)."""
    extra_overrides: tuple[str, ...] = ()
    """More ``--section.key=value`` overrides applied to every run (e.g. data.*)."""

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        if not self.workers or any(m < 2 for m in self.workers):
            raise ValueError(f"workers: every M must be >= 2 (got {list(self.workers)})")
        if len(set(self.workers)) != len(self.workers):
            raise ValueError(f"workers: each M once (got {list(self.workers)})")
        if self.eval_every % self.log_every:
            raise ValueError(f"log_every ({self.log_every}) must divide eval_every ({self.eval_every})")
        budget = len(self.outer_lrs) * len(self.sync_everys)
        if len(self.dp_lrs) != budget or budget == 0:
            raise ValueError(
                f"the sweeps must have equal budgets: {len(self.dp_lrs)} DP learning rates vs "
                f"{len(self.outer_lrs)} outer lrs × {len(self.sync_everys)} H = {budget}"
            )
        from farsync.models.llama import MODEL_SIZES

        for s in (self.size, *self.sizes):
            if s not in MODEL_SIZES:
                raise ValueError(f"model size {s!r} is not one of {', '.join(MODEL_SIZES)}")
        if self.size not in self.sizes:
            raise ValueError(f"sizes {list(self.sizes)} must include the table size {self.size!r}")


FULL = QualitySpec()

# --quick: every stage and method, on the nano model for a few steps. Its figures mean
# nothing; it tests the harness (CI runs it).
QUICK = QualitySpec(
    size="nano", seq_len=64, batch_size=4, steps=30, warmup_steps=5, eval_every=10, eval_batches=4,
    log_every=5, dp_lrs=(3e-3, 6e-3), outer_lrs=(0.4, 0.7), sync_everys=(10,), sizes=("nano", "tiny"),
    runtime_limit_s=300.0,
)


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    mode: str
    overlap: bool = False
    codec: str = "fp32"


METHODS: tuple[Method, ...] = (
    Method("dp", "Data-parallel", "dp"),
    Method("diloco", "DiLoCo", "diloco"),
    Method("streaming", "Streaming DiLoCo (τ=0)", "streaming"),
    Method("overlap", "Streaming + overlap", "streaming", True),
    Method("overlap-fp4-e3m0", "Streaming + overlap + fp4-e3m0", "streaming", True, "fp4-e3m0"),
    Method("overlap-fp4-e2m1", "Streaming + overlap + fp4-e2m1", "streaming", True, "fp4-e2m1"),
    Method("overlap-int8", "Streaming + overlap + int8", "streaming", True, "int8"),
)
BY_KEY = {m.key: m for m in METHODS}
#: the method the headline target is about
HEADLINE = "overlap-fp4-e3m0"
#: tuning families: which method each sweep tunes
FAMILIES = ("dp", "diloco", "streaming")


@dataclass(frozen=True)
class Hparams:
    lr: float
    outer_lr: float | None = None
    sync_every: int | None = None

    def label(self) -> str:
        if self.outer_lr is None:
            return f"lr {self.lr:g}"
        return f"outer lr {self.outer_lr:g}, H {self.sync_every}"


@dataclass(frozen=True)
class Job:
    """One training run."""

    method: Method
    workers: int
    size: str
    hp: Hparams

    @property
    def name(self) -> str:
        s = f"{self.size}-m{self.workers}-{self.method.key}-lr{self.hp.lr:g}"
        if self.method.mode != "dp":
            s += f"-olr{self.hp.outer_lr:g}-H{self.hp.sync_every}"
        return s

    def overrides(self, spec: QualitySpec) -> list[str]:
        """The run's ``--section.key=value`` overrides of the trainer's defaults."""
        m, hp = self.method, self.hp
        o = [
            f"--model.size={self.size}", f"--model.seq_len={spec.seq_len}",
            f"--algo.mode={m.mode}", f"--algo.workers={self.workers}",
            f"--optim.lr={hp.lr}", f"--optim.warmup_steps={spec.warmup_steps}",
            f"--train.steps={spec.steps}", f"--train.batch_size={spec.batch_size}", f"--train.seed={spec.seed}",
            f"--train.eval_every={spec.eval_every}", f"--train.eval_batches={spec.eval_batches}",
            f"--train.log_every={spec.log_every}", "--train.checkpoint_every=0", "--train.progress=false",
            "--train.threads=1", "--train.device=cpu",
        ]
        if m.mode == "dp":  # DP gradients travel as fp32 whatever algo.codec says; say fp32
            o += ["--algo.fragments=1", "--algo.sync_delay=0", "--algo.codec=fp32"]
        else:
            o += [
                f"--algo.inner_steps={hp.sync_every}", f"--algo.outer_lr={hp.outer_lr}",
                f"--algo.fragments={1 if m.mode == 'diloco' else spec.fragments}",
                f"--algo.sync_delay={spec.overlap_delay if m.overlap else 0}", f"--algo.codec={m.codec}",
            ]
        return o + list(spec.extra_overrides)


def sweep_jobs(spec: QualitySpec) -> dict[str, list[Job]]:
    """Stage 1: the tuning runs of each family, at M = workers[0]."""
    M = spec.workers[0]
    out = {"dp": [Job(BY_KEY["dp"], M, spec.size, Hparams(lr)) for lr in spec.dp_lrs]}
    for fam in ("diloco", "streaming"):
        out[fam] = [
            Job(BY_KEY[fam], M, spec.size, Hparams(spec.inner_lr, olr, H))
            for olr in spec.outer_lrs for H in spec.sync_everys
        ]
    return out


def hparams_for(method: Method, best: dict[str, Hparams]) -> Hparams:
    """DP and DiLoCo use their own tuned values; every Streaming variant uses Streaming's."""
    return best["dp"] if method.mode == "dp" else best["diloco"] if method.mode == "diloco" else best["streaming"]


def table_jobs(spec: QualitySpec, best: dict[str, Hparams]) -> dict[int, list[Job]]:
    """Stage 2: the seven methods for each M."""
    return {M: [Job(m, M, spec.size, hparams_for(m, best)) for m in METHODS] for M in spec.workers}


def size_jobs(spec: QualitySpec, best: dict[str, Hparams]) -> dict[str, list[Job]]:
    """Stage 3: DP and the headline method at each size, M = workers[0]."""
    pair = (BY_KEY["dp"], BY_KEY[HEADLINE])
    return {s: [Job(m, spec.workers[0], s, hparams_for(m, best)) for m in pair] for s in spec.sizes}


# ---- running ------------------------------------------------------------------------

def _train_job(name: str, overrides: list[str], work_dir: str) -> dict:
    """Train one run (in a pool process); return its record. The trainer's log lines go
    to ``work_dir/name.log``; checkpoints are deleted (only metrics are needed)."""
    from farsync.train.config import build_config
    from farsync.train.loop import train

    cfg = build_config(None, overrides + [f"--train.run_dir={work_dir}", f"--train.name={name}"])
    os.makedirs(work_dir, exist_ok=True)
    with open(os.path.join(work_dir, f"{name}.log"), "w") as logf, contextlib.redirect_stderr(logf):
        summary = train(cfg)
    run_dir = summary["run_dir"]
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    return _record(name, cfg, summary, run_dir)


def _record(name: str, cfg, summary: dict, run_dir: str) -> dict:
    """A run's figures, and its eval curve with the bytes all workers had sent by then."""
    M = cfg.algo.workers
    bytes_at: dict[int, float] = {}
    evals = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row["kind"] == "train":
                bytes_at[row["step"]] = row["bytes_sent_per_worker"] * M
            else:
                evals.append(row)
    curve = []
    for row in evals:
        # the final eval follows finish(), which lands fragments still in flight: use the
        # summary's total there, the train row of the same step elsewhere
        b = summary["bytes_sent_total"] if row["step"] == cfg.train.steps else bytes_at[row["step"]]
        curve.append({"step": row["step"], "tokens": row["tokens"], "eval_loss": row["eval_loss"],
                      "bytes_sent_total": int(round(b))})
    a = cfg.algo
    return {
        "name": name,
        "run_dir": run_dir,
        "workers": M,
        "size": cfg.model.size,
        "parameters": summary["parameters"],
        "mode": a.mode,
        "hparams": {
            "lr": cfg.optim.lr,
            **({} if a.mode == "dp" else {
                "outer_lr": a.outer_lr, "outer_momentum": a.outer_momentum, "sync_every": a.inner_steps,
                "num_fragments": a.fragments, "sync_delay": a.sync_delay, "codec": a.codec,
            }),
        },
        "optim": dataclasses.asdict(cfg.optim),
        "steps": summary["steps"],
        "tokens": summary["tokens"],
        "final_eval_loss": summary["final_eval_loss"],
        "bytes_sent_total": summary["bytes_sent_total"],
        "bytes_sent_per_worker_max": max(summary["bytes_sent_per_worker"]),
        "dp_equivalent_bytes_total": summary["dp_equivalent_bytes_per_worker"] * M,
        "peak_bytes_per_sync": summary["peak_bytes_per_sync"],
        "sync_events": summary["sync_events"],
        "wall_seconds": summary["wall_seconds"],
        "curve": curve,
    }


def _cost(job: Job) -> float:
    """Relative compute of a run, to start the longest first (order only)."""
    from farsync.models.llama import MODEL_SIZES

    s = MODEL_SIZES[job.size]
    return job.workers * (12 * s["n_layers"] * s["dim"] ** 2 + 2 * s["dim"] * 4096)


def run_jobs(jobs: list[Job], spec: QualitySpec, work_dir: str, n_procs: int, done: dict[str, dict],
             log: Log) -> None:
    """Train every job not yet in ``done`` (keyed by name); add the records to it."""
    todo: dict[str, Job] = {}
    for j in jobs:
        if j.name not in done:
            todo.setdefault(j.name, j)
    order = sorted(todo.values(), key=_cost, reverse=True)
    if not order:
        return
    count = 0

    def finished(rec: dict) -> None:
        nonlocal count
        count += 1
        done[rec["name"]] = rec
        log(f"  [{count}/{len(order)}] {rec['name']:<48} eval loss {rec['final_eval_loss']:.4f}  "
            f"{rec['wall_seconds']:.0f} s")

    if n_procs <= 1:
        for j in order:
            finished(_train_job(j.name, j.overrides(spec), work_dir))
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    with ProcessPoolExecutor(max_workers=min(n_procs, len(order)), mp_context=ctx) as pool:
        futures = [pool.submit(_train_job, j.name, j.overrides(spec), work_dir) for j in order]
        for fut in as_completed(futures):
            finished(fut.result())


# ---- the report ---------------------------------------------------------------------

def _loss_key(rec: dict) -> float:
    v = rec["final_eval_loss"]
    return v if v is not None and math.isfinite(v) else math.inf


def _table(records: list[dict]) -> list[dict]:
    """Rows of one table; ratios against its DP and DiLoCo runs."""
    dp = next(r for r in records if r["method"] == "dp")
    diloco = next(r for r in records if r["method"] == "diloco")
    rows = []
    for r in records:
        rows.append({
            "method": r["method"],
            "label": r["label"],
            "run": r["name"],
            "hparams": r["hparams"],
            "final_eval_loss": r["final_eval_loss"],
            "loss_ratio_to_dp": r["final_eval_loss"] / dp["final_eval_loss"],
            "bytes_sent_total": r["bytes_sent_total"],
            "dp_bytes_ratio": dp["bytes_sent_total"] / r["bytes_sent_total"],
            "peak_bytes_per_sync": r["peak_bytes_per_sync"],
            "peak_ratio_diloco_to_method": diloco["peak_bytes_per_sync"] / r["peak_bytes_per_sync"],
            "sync_events": r["sync_events"],
            "wall_seconds": r["wall_seconds"],
            "tokens": r["tokens"],
        })
    return rows


def _sweep_summary(jobs: list[Job], runs: dict[str, dict]) -> dict:
    grid = [{"hparams": asdict(j.hp), "run": j.name, "final_eval_loss": runs[j.name]["final_eval_loss"]} for j in jobs]
    losses = [g["final_eval_loss"] for g in grid]
    best = min(grid, key=lambda g: _loss_key(g))
    finite = [x for x in losses if x is not None and math.isfinite(x)]
    lo, hi = (min(finite), max(finite)) if finite else (math.nan, math.nan)
    return {"grid": grid, "best": best, "spread": {"min": lo, "max": hi, "range": hi - lo,
                                                   "range_pct_of_min": 100 * (hi - lo) / lo if finite else math.nan}}


def _labelled(rec: dict, method: Method) -> dict:
    return {**rec, "method": method.key, "label": method.label}


def build_report(spec: QualitySpec, runs: dict[str, dict], best: dict[str, Hparams], runtime_s: float,
                 quick: bool, command: str) -> dict:
    """Everything quality.json holds, from the finished runs."""
    sweeps = sweep_jobs(spec)
    tables = {str(M): _table([_labelled(runs[j.name], j.method) for j in js])
              for M, js in table_jobs(spec, best).items()}
    size_rows = []
    for s, (dp_job, head_job) in size_jobs(spec, best).items():
        dp, head = runs[dp_job.name], runs[head_job.name]
        size_rows.append({
            "size": s, "parameters": dp["parameters"], "tokens": dp["tokens"],
            "dp_eval_loss": dp["final_eval_loss"], "streaming_fp4_eval_loss": head["final_eval_loss"],
            "loss_ratio_to_dp": head["final_eval_loss"] / dp["final_eval_loss"],
            "gap_pct": 100 * (head["final_eval_loss"] / dp["final_eval_loss"] - 1),
            "dp_bytes_ratio": dp["bytes_sent_total"] / head["bytes_sent_total"],
            "runs": [dp_job.name, head_job.name],
        })
    size_rows.sort(key=lambda r: r["parameters"])

    main = {r["method"]: r for r in tables[str(spec.workers[0])]}
    head = main[HEADLINE]
    peak = main["streaming"]["peak_ratio_diloco_to_method"]
    targets = {
        "headline_within_1pct_of_dp": {
            "what": f"{head['label']} final eval loss ≤ 1.01 × DP's (M = {spec.workers[0]})",
            "value": head["loss_ratio_to_dp"], "threshold": 1.01, "met": head["loss_ratio_to_dp"] <= 1.01,
        },
        "headline_100x_fewer_bytes": {
            "what": f"{head['label']} sends ≥ 100× fewer bytes than DP (M = {spec.workers[0]})",
            "value": head["dp_bytes_ratio"], "threshold": 100, "met": head["dp_bytes_ratio"] >= 100,
        },
        "peak_about_P_lower": {
            "what": f"DiLoCo's peak bytes per sync ÷ Streaming's (both fp32) within ±25 % of P = {spec.fragments}",
            "value": peak, "threshold": [0.75 * spec.fragments, 1.25 * spec.fragments],
            "met": 0.75 * spec.fragments <= peak <= 1.25 * spec.fragments,
        },
        "runtime": {
            "what": f"{'--quick' if quick else 'full benchmark'} ≤ {spec.runtime_limit_s / 60:g} min on this machine",
            "value": runtime_s, "threshold": spec.runtime_limit_s, "met": runtime_s <= spec.runtime_limit_s,
        },
    }
    return {
        "benchmark": "quality",
        "quick": quick,
        "date": dt.date.today().isoformat(),
        "command": command,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": _torch_version(), "cpus": os.cpu_count()},
        "runtime_seconds": runtime_s,
        "spec": asdict(spec),
        "tuning": {
            "workers": spec.workers[0],
            "inner_lr_diloco_streaming": spec.inner_lr,
            "families": {fam: _sweep_summary(sweeps[fam], runs) for fam in FAMILIES},
            "chosen": {fam: asdict(best[fam]) for fam in FAMILIES},
        },
        "tables": tables,
        "size_study": size_rows,
        "targets": targets,
        "runs": runs,
    }


def _torch_version() -> str:
    import torch

    return torch.__version__


def run_benchmark(spec: QualitySpec, out_dir: str, work_dir: str, jobs: int = 2, quick: bool = False,
                  command: str = "", log: Log | None = None) -> dict:
    """Run the three stages, write quality.json, quality.md and the plots to ``out_dir``;
    return the report. Run directories go under ``work_dir``."""
    from farsync.bench.quality_report import write_markdown, write_plots
    from farsync.train.config import build_config

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    spec.validate()
    # every configuration the plan can produce is checked before anything trains
    probe = {"dp": Hparams(spec.dp_lrs[0]), "diloco": Hparams(spec.inner_lr, spec.outer_lrs[0], spec.sync_everys[0])}
    for H in spec.sync_everys:
        probe["streaming"] = Hparams(spec.inner_lr, spec.outer_lrs[0], H)
        for js in [*table_jobs(spec, probe).values(), *size_jobs(spec, probe).values()]:
            for j in js:
                build_config(None, j.overrides(spec))

    t0 = time.perf_counter()
    runs: dict[str, dict] = {}
    sweeps = sweep_jobs(spec)
    n = sum(len(v) for v in sweeps.values())
    log(f"quality: stage 1/2, tuning at M = {spec.workers[0]} ({n} runs, {jobs} at a time)")
    run_jobs([j for js in sweeps.values() for j in js], spec, work_dir, jobs, runs, log)
    best = {fam: min(js, key=lambda j: _loss_key(runs[j.name])).hp for fam, js in sweeps.items()}
    log("quality: tuned " + "; ".join(f"{fam}: {hp.label()}" for fam, hp in best.items()))

    rest = [j for js in table_jobs(spec, best).values() for j in js] + \
           [j for js in size_jobs(spec, best).values() for j in js]
    log(f"quality: stage 2/2, tables for M = {', '.join(map(str, spec.workers))} and the size study "
        f"({len({j.name for j in rest} - set(runs))} more runs)")
    run_jobs(rest, spec, work_dir, jobs, runs, log)
    runtime = time.perf_counter() - t0

    report = build_report(spec, runs, best, runtime, quick, command)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "quality.json"), "w") as f:
        json.dump(report, f, indent=1)
    write_markdown(report, os.path.join(out_dir, "quality.md"))
    write_plots(report, out_dir)
    log(f"quality: done in {runtime:.0f} s; wrote {out_dir}/quality.json, quality.md and plots")
    return report


def spec_with(base: QualitySpec, **changes) -> QualitySpec:
    """``base`` with the given fields replaced (None values ignored)."""
    return replace(base, **{k: v for k, v in changes.items() if v is not None})


__all__ = ["FULL", "QUICK", "METHODS", "HEADLINE", "QualitySpec", "Hparams", "Job", "run_benchmark", "spec_with",
           "build_report"]
