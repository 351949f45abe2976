"""The quality benchmark: does (Streaming) DiLoCo reach data-parallel's loss, in the regime
where the papers measured it, while sending two to three orders of magnitude fewer bytes?

Anchors: Scaling Laws for DiLoCo (arXiv 2503.09799) Table 4 — C4, 20 tokens per parameter,
H = 30, hyperparameters tuned per M — has DiLoCo at M = 1, 2, 4, 8 within −0.1, +0.7, +2.0
and +3.9 % of data-parallel at 35M parameters, the gap shrinking with size (its Table 7
power laws predict the gap at any size). Streaming DiLoCo (arXiv 2501.18512) adds
fragments, overlap and 4-bit exchange at the same loss.

The regime, chosen so that a 2-core CPU can afford it without cutting rounds:

* one model (``size``) trained on ``tokens_per_param`` tokens per parameter, every run the
  same tokens: a fixed **global batch** of ``global_batch`` sequences per step, split evenly
  over the M workers. DP averages the M gradients, so in exact arithmetic it is the same
  optimisation whatever M; but each worker draws from its own shard of the data, and at
  this size the final loss depends on those batches by ±1 %, so every M has its own DP
  run on exactly the batches the methods at that M see (its lr tuned once, at M = 1),
  and the gap is taken against it (the gap to DP at M = 1 is reported beside it);
* steps = tokens ÷ (global batch × sequence length), rounded to a multiple of
  ``step_multiple`` so that every H tried divides it: each run ends on a sync and gets
  ≥ 50 outer rounds at the largest H (checked);
* the same held-out sequences evaluate every run.

The plan:

1. **Tuning with equal budgets**, at M = ``tune_workers``: DP over its learning rate
   (``dp_lrs``), DiLoCo over (inner lr, outer lr, H) (``diloco_grid``, as many points).
2. **The M table**: DiLoCo at every M of ``workers``. M ≠ ``tune_workers`` reuse the tuned
   inner lr and H and sweep the outer lr (``outer_lrs_by_workers``), as the scaling-law
   paper tunes it per M.
3. **Streaming** at M = ``tune_workers`` with the tuned DiLoCo hyperparameters (at the
   smallest H that meets the bytes target, if the tuned H does not): P = ``fragments``
   strided fragments, τ = 0 (fp32); and overlap τ = ``overlap_delay`` with the headline
   codec over the mixing α (``overlap_mixings``), then the other ``streaming_codecs`` at
   the best α.
4. **Beyond the papers**: the headline configuration with each option of ``variants``.
5. **The sparse frontier** (SparseLoCo, arXiv 2508.15706): the headline configuration with
   a sparse top-k codec and error feedback, in two families tuned with equal budgets at
   ``sparse_headline`` — *SparseLoCo* (no outer momentum: the accumulator e ← β·e + Δ stands
   in for it, β = ``sparse_decay``; the outer lr over ``sparseloco_outer_lrs``) and
   *EF + Nesterov* (the tuned outer step; β over ``sparse_nesterov_decays``) — then every
   density of ``sparse_codecs`` and every H of ``frontier_inner_steps`` at each family's
   best, and the best family and the headline again at each M of ``frontier_workers``.
6. **Seeds**: the headline rows again with every seed of ``seeds``, and the best sparse row
   that sends ``frontier_bytes_target`` times fewer bytes than DP.

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
from dataclasses import asdict, dataclass, field, replace

Log = Callable[[str], None]

#: Scaling Laws for DiLoCo (arXiv 2503.09799): Table 4's 35M row (gap to DP, %) and
#: Table 7's power-law fits L(N) = A·N^α of DP and DiLoCo at M = 2, 4, 8.
PAPER_35M_GAP_PCT = {1: -0.1, 2: 0.7, 4: 2.0, 8: 3.9}
POWER_LAWS = {"dp": (18.129, -0.0953), 2: (18.768, -0.0969), 4: (19.762, -0.0992), 8: (21.051, -0.1018)}


def scaling_law_gap_pct(workers: int, parameters: int) -> float | None:
    """The gap to DP (%) that Table 7's fits predict for M workers at N parameters
    (None for M without a fit)."""
    if workers not in POWER_LAWS:
        return None
    (a_dp, e_dp), (a_m, e_m) = POWER_LAWS["dp"], POWER_LAWS[workers]
    return 100.0 * ((a_m * parameters ** e_m) / (a_dp * parameters ** e_dp) - 1.0)


@dataclass(frozen=True)
class Hparams:
    """What tuning chooses: the (inner) lr, and for DiLoCo the outer lr, outer momentum
    and H."""

    lr: float
    outer_lr: float | None = None
    outer_momentum: float | None = None
    inner_steps: int | None = None

    def label(self) -> str:
        if self.outer_lr is None:
            return f"lr {self.lr:g}"
        return (f"inner lr {self.lr:g}, outer lr {self.outer_lr:g}, momentum {self.outer_momentum:g}, "
                f"H {self.inner_steps}")


#: the variant name of the DiLoCo row run at Streaming's H, when that is not the tuned H
AT_STREAMING_H = "at Streaming's H"

#: the options tried beyond the papers, as trainer overrides on the headline configuration
VARIANTS: dict[str, tuple[str, ...]] = {
    "error-feedback": ("--algo.error_feedback=true",),
}


@dataclass(frozen=True)
class QualitySpec:
    """What the benchmark trains. Defaults: the full benchmark on the 2-core CPU box."""

    size: str = "micro"
    """Model size (models.MODEL_SIZES)."""
    vocab_size: int = 512
    """BPE vocabulary: a small one keeps the head from dominating the step on CPU."""
    seq_len: int = 128
    """Tokens per sequence (T)."""
    global_batch: int = 16
    """Sequences per step over all workers; each of M workers gets global_batch / M."""
    tokens_per_param: float = 20.0
    """Token budget per model parameter (the scaling-law paper's 20)."""
    step_multiple: int = 60
    """Steps are rounded to a multiple of this, which every H tried must divide."""
    min_rounds: int = 50
    """Each DiLoCo run must get at least this many outer rounds (checked)."""
    warmup_steps: int = 50
    """Linear warmup of the inner lr (then cosine decay to 10 %)."""
    evals: int = 10
    """Evaluations per run, evenly spaced (the last at the end)."""
    eval_sequences: int = 128
    """Held-out sequences per evaluation, the same for every run."""
    workers: tuple[int, ...] = (1, 2, 4, 8)
    """M of the table."""
    tune_workers: int = 4
    """M at which DP and DiLoCo are tuned and Streaming is run."""
    weight_decay: float = 0.01
    """Inner AdamW weight decay of every run (DiLoCo's compensated for the outer gain, the
    trainer's default). DP's loss at this size is flat between 0 and 0.014 and 1.7 % worse
    at 0.1, so the baseline gets a value where it is at its best."""
    dp_lrs: tuple[float, ...] = (2e-3, 3e-3, 4e-3, 6e-3, 8e-3, 1.1e-2, 1.6e-2, 2.2e-2, 3.2e-2)
    """DP learning rates tried."""
    diloco_grid: tuple[tuple[float, float, float, int], ...] = (
        (4e-3, 0.7, 0.8, 20),                        # the centre; then one axis at a time:
        (2e-3, 0.7, 0.8, 20), (8e-3, 0.7, 0.8, 20),  # inner lr
        (4e-3, 0.5, 0.8, 20), (4e-3, 1.0, 0.8, 20),  # outer lr
        (4e-3, 0.7, 0.7, 20), (4e-3, 0.7, 0.9, 20),  # outer momentum
        (4e-3, 0.7, 0.8, 10), (4e-3, 0.7, 0.8, 30),  # H
    )
    """(inner lr, outer lr, outer momentum, H) points tried at M = tune_workers; as many as
    dp_lrs. The first is the centre the loss-vs-hyperparameter plots slice through."""
    outer_lrs_by_workers: tuple[tuple[int, tuple[float, ...]], ...] = (
        (1, (0.3, 0.5, 0.7)), (2, (0.5, 0.7, 1.0)), (8, (0.7, 1.0, 1.3)),
    )
    """Outer lrs tried at each other M (inner lr, momentum and H as tuned)."""
    streaming_min_bytes_ratio: float = 100.0
    """Streaming runs at the tuned H, or at the smallest H of the grid that sends this many
    times fewer bytes than DP with the headline codec if the tuned H does not."""
    fragments: int = 2
    """P of the Streaming runs (strided)."""
    overlap_delay: int = 1
    """τ of the overlapped Streaming runs."""
    overlap_mixings: tuple[float, ...] = (0.0, 0.25, 0.5)
    """α tried for the overlapped Streaming runs (headline codec); the paper's is 0.5."""
    streaming_codecs: tuple[str, ...] = ("fp32", "int8", "fp4-e3m0")
    """Pseudo-gradient codecs of the overlapped Streaming runs."""
    headline_codec: str = "fp4-e3m0"
    """The overlapped Streaming codec the targets and variants are about."""
    variants: tuple[str, ...] = ("error-feedback",)
    """Options beyond the papers tried on the headline configuration (VARIANTS)."""
    sparse_codecs: tuple[str, ...] = ("topk16-int2", "topk32-int2", "topk64-int2", "topk128-int2")
    """The frontier's sparse codecs (all with error feedback): 1 value in D per chunk, 2-bit values."""
    sparse_headline: str = "topk64-int2"
    """The sparse codec both families are tuned at."""
    sparse_decay: float = 0.95
    """SparseLoCo's error-feedback decay β (its paper's)."""
    sparseloco_outer_lrs: tuple[float, ...] = (1.5, 2.5, 4.0)
    """SparseLoCo family (outer momentum 0): outer lrs tried."""
    sparse_nesterov_decays: tuple[float, ...] = (0.95, 0.9, 0.8)
    """EF + Nesterov family (the tuned outer lr and momentum): error-feedback decays tried."""
    frontier_inner_steps: tuple[int, ...] = (30,)
    """Other H of the frontier (each family's best at the headline density)."""
    frontier_workers: tuple[int, ...] = (2,)
    """Other M of the frontier: the headline and the best sparse family again there."""
    frontier_bytes_target: float = 1000.0
    """The frontier's target: this many times fewer bytes than DP (at M = tune_workers)."""
    seeds: tuple[int, ...] = (0, 1)
    """Seeds of the headline rows (DP, DiLoCo at every M, the headline); others seed 0."""
    runtime_limit_s: float = 4500.0
    """The runtime target this configuration is held to (reported, not enforced)."""
    extra_overrides: tuple[str, ...] = ()
    """More ``--section.key=value`` overrides applied to every run (e.g. data.*)."""

    def parameters(self) -> int:
        from farsync.models import Llama, model_config

        import torch

        with torch.device("meta"):
            return Llama(model_config(self.size, self.vocab_size, self.seq_len)).num_parameters()

    def streaming_bytes_ratio(self, inner_steps: int) -> float:
        """DP's bytes ÷ Streaming's (P fragments, headline codec) per worker at M =
        tune_workers, from the exchange plans the run will use (sync payloads and
        control bytes; the run's own accounting is what the report shows)."""
        import torch

        from farsync.algorithms.accounting import dp_bytes_per_step
        from farsync.algorithms.fragments import build_fragments
        from farsync.codecs import get_codec
        from farsync.comm.exchange import make_plan
        from farsync.models import Llama, model_config

        with torch.device("meta"):
            model = Llama(model_config(self.size, self.vocab_size, self.seq_len))
        M, codec = self.tune_workers, get_codec(self.headline_codec)
        per_round = 0
        for frag in build_fragments(model, self.fragments, "strided", None):
            plan = make_plan(sum(p.numel() for p in frag.params), M, codec)
            per_round += plan.bytes_sent + plan.control_bytes
        return inner_steps * dp_bytes_per_step(M, model.num_parameters()) / per_round

    def streaming_inner_steps(self, tuned: int) -> int:
        """H of the Streaming runs: the tuned H if it meets streaming_min_bytes_ratio,
        else the smallest H of the grid that does (else the largest)."""
        Hs = sorted({p[-1] for p in self.diloco_grid} | {tuned})
        ok = [H for H in Hs if H >= tuned and self.streaming_bytes_ratio(H) >= self.streaming_min_bytes_ratio]
        return ok[0] if ok else Hs[-1]

    def steps(self) -> int:
        per_step = self.global_batch * self.seq_len
        raw = self.tokens_per_param * self.parameters() / per_step
        return max(self.step_multiple, self.step_multiple * round(raw / self.step_multiple))

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        from farsync.models.llama import MODEL_SIZES

        if self.size not in MODEL_SIZES:
            raise ValueError(f"size {self.size!r} is not one of {', '.join(MODEL_SIZES)}")
        if not self.workers or any(m < 1 for m in self.workers) or len(set(self.workers)) != len(self.workers):
            raise ValueError(f"workers: distinct M >= 1 (got {list(self.workers)})")
        if self.tune_workers not in self.workers or self.tune_workers < 2:
            raise ValueError(f"tune_workers ({self.tune_workers}) must be >= 2 and one of workers {list(self.workers)}")
        for m in self.workers:
            if self.global_batch % m:
                raise ValueError(f"global_batch ({self.global_batch}) must be divisible by every M (not by {m})")
        if len(self.dp_lrs) != len(self.diloco_grid) or not self.dp_lrs:
            raise ValueError(
                f"equal tuning budgets: {len(self.dp_lrs)} DP learning rates vs {len(self.diloco_grid)} DiLoCo points")
        others = dict(self.outer_lrs_by_workers)
        missing = [m for m in self.workers if m != self.tune_workers and m not in others]
        if missing:
            raise ValueError(f"outer_lrs_by_workers has no outer lrs for M = {missing}")
        steps = self.steps()
        for *_, H in self.diloco_grid:
            if steps % H:
                raise ValueError(f"H = {H} does not divide the {steps} steps; change step_multiple or the grid")
            if steps // H < self.min_rounds:
                raise ValueError(f"H = {H} gives {steps // H} outer rounds over {steps} steps, fewer than "
                                 f"min_rounds = {self.min_rounds}: lower H or raise tokens_per_param")
        if self.headline_codec not in self.streaming_codecs:
            raise ValueError(f"headline_codec {self.headline_codec!r} must be one of streaming_codecs")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
        if self.eval_sequences < 1 or self.eval_sequences % self.global_batch:
            # a multiple of the global batch is a multiple of every M's per-worker batch, so
            # eval_batches × B, and with it the held-out set, is the same for every M
            raise ValueError(f"eval_sequences ({self.eval_sequences}) must be a positive multiple of "
                             f"global_batch ({self.global_batch})")
        if 0 not in self.seeds:
            raise ValueError(f"seeds must include 0 (got {list(self.seeds)})")
        from farsync.codec_names import is_sparse

        if self.sparse_headline not in self.sparse_codecs or not all(is_sparse(c) for c in self.sparse_codecs):
            raise ValueError(f"sparse_codecs must be sparse codecs including sparse_headline {self.sparse_headline!r}")
        if len(self.sparseloco_outer_lrs) != len(self.sparse_nesterov_decays):
            raise ValueError(f"equal tuning budgets: {len(self.sparseloco_outer_lrs)} SparseLoCo outer lrs vs "
                             f"{len(self.sparse_nesterov_decays)} EF + Nesterov decays")
        for H in self.frontier_inner_steps:
            if steps % H or steps // H < self.min_rounds:
                raise ValueError(f"frontier H = {H} must divide the {steps} steps into >= {self.min_rounds} rounds")
        if any(m not in self.workers or m == self.tune_workers for m in self.frontier_workers):
            raise ValueError(f"frontier_workers {list(self.frontier_workers)} must be other M of workers")


FULL = QualitySpec()

# --quick: every stage on the nano model for a few steps. Its figures mean nothing; it
# tests the harness (CI runs it).
QUICK = QualitySpec(
    size="nano", seq_len=32, global_batch=8, tokens_per_param=0.125, step_multiple=12, min_rounds=2,
    warmup_steps=4, evals=3, eval_sequences=16, workers=(1, 2, 4), tune_workers=4,
    dp_lrs=(3e-3, 6e-3), diloco_grid=((3e-3, 0.7, 0.8, 4), (3e-3, 0.7, 0.8, 6)),
    outer_lrs_by_workers=((1, (0.4,)), (2, (0.7,))), overlap_mixings=(0.0, 0.5), runtime_limit_s=180.0,
    sparse_codecs=("topk16-int2", "topk64-int2"), sparseloco_outer_lrs=(1.5,), sparse_nesterov_decays=(0.95,),
    frontier_inner_steps=(), frontier_bytes_target=10.0,
)


@dataclass(frozen=True)
class Job:
    """One training run."""

    method: str  # dp, diloco, streaming, streaming-overlap
    workers: int
    hp: Hparams
    codec: str = "fp32"
    variant: str | None = None
    seed: int = 0
    mixing: float | None = None  # α of an overlapped Streaming run (None: the trainer's default)
    ef_decay: float | None = None  # error feedback with this decay β (None: the variant's or none)

    @property
    def name(self) -> str:
        s = f"m{self.workers}-{self.method}-lr{self.hp.lr:g}"
        if self.method != "dp":
            s += f"-olr{self.hp.outer_lr:g}-mom{self.hp.outer_momentum:g}-H{self.hp.inner_steps}"
        if self.method == "streaming-overlap":
            s += f"-{self.codec}" + ("" if self.mixing is None else f"-mix{self.mixing:g}")
        if self.ef_decay is not None:
            s += f"-ef{self.ef_decay:g}"
        if self.variant:
            s += f"-{self.variant}"
        return s + f"-s{self.seed}"

    @property
    def family(self) -> str | None:
        """The sparse frontier's family: SparseLoCo (no outer momentum) or EF + Nesterov."""
        if self.ef_decay is None:
            return None
        return "sparseloco" if self.hp.outer_momentum == 0 else "ef-nesterov"

    def overrides(self, spec: QualitySpec) -> list[str]:
        """The run's ``--section.key=value`` overrides of the trainer's defaults."""
        steps = spec.steps()
        B = spec.global_batch // self.workers
        every = max(1, steps // spec.evals)
        o = [
            f"--model.size={spec.size}", f"--model.seq_len={spec.seq_len}", f"--data.vocab_size={spec.vocab_size}",
            f"--algo.mode={'streaming' if self.method.startswith('streaming') else self.method}",
            f"--algo.workers={self.workers}", f"--optim.lr={self.hp.lr}", f"--optim.warmup_steps={spec.warmup_steps}",
            f"--optim.weight_decay={spec.weight_decay}", f"--train.steps={steps}", f"--train.batch_size={B}", f"--train.seed={self.seed}",
            # the same held-out windows for every M: eval_batches × B is constant
            f"--train.eval_every={every}", f"--train.eval_batches={max(1, spec.eval_sequences // B)}",
            f"--train.log_every={math.gcd(every, 10)}", "--train.checkpoint_every=0", "--train.progress=false",
            "--train.threads=1", "--train.device=cpu", "--train.launch=inprocess",  # the pool runs jobs side by side
        ]
        if self.method == "dp":
            o += ["--algo.fragments=1", "--algo.sync_delay=0", "--algo.codec=fp32"]
        else:
            streaming = self.method.startswith("streaming")
            o += [
                f"--algo.inner_steps={self.hp.inner_steps}", f"--algo.outer_lr={self.hp.outer_lr}",
                f"--algo.outer_momentum={self.hp.outer_momentum}",
                f"--algo.fragments={spec.fragments if streaming else 1}",
                f"--algo.sync_delay={spec.overlap_delay if self.method == 'streaming-overlap' else 0}",
                f"--algo.codec={self.codec}",
            ]
        if self.mixing is not None:
            o.append(f"--algo.mixing={self.mixing}")
        if self.ef_decay is not None:
            o += ["--algo.error_feedback=true", f"--algo.error_feedback_decay={self.ef_decay}"]
        if self.variant:
            o += list(VARIANTS[self.variant])
        return o + list(spec.extra_overrides)


@dataclass
class Stages:
    """Every job of every stage; stage 2+ depend on what stage 1 chose."""

    tune_dp: list[Job]
    tune_diloco: list[Job]
    by_workers: dict[int, list[Job]] = field(default_factory=dict)  # DiLoCo at each other M
    dp_by_workers: dict[int, Job] = field(default_factory=dict)  # tuned DP at each M > 1
    streaming: list[Job] = field(default_factory=list)  # (DiLoCo at Streaming's H,) Streaming τ = 0
    mixing: list[Job] = field(default_factory=list)  # overlap + headline codec, each α
    overlap: list[Job] = field(default_factory=list)  # overlap, every codec, at the best α
    variants: list[Job] = field(default_factory=list)
    sparse_tune: dict[str, list[Job]] = field(default_factory=dict)  # family -> its tuning runs
    frontier: list[Job] = field(default_factory=list)  # densities, H and M at each family's best
    seeds: list[Job] = field(default_factory=list)


def tuning_jobs(spec: QualitySpec) -> Stages:
    """Stage 1: DP over its lr at M = 1 (one optimisation at any M, in exact arithmetic) and
    DiLoCo over its grid at M = tune_workers."""
    return Stages(
        tune_dp=[Job("dp", 1, Hparams(lr)) for lr in spec.dp_lrs],
        tune_diloco=[Job("diloco", spec.tune_workers, Hparams(lr, olr, mom, H)) for lr, olr, mom, H in spec.diloco_grid],
    )


def later_jobs(spec: QualitySpec, plan: Stages, best_dp: Hparams, best_diloco: Hparams) -> Stages:
    """Stages 2–5, given what tuning chose."""
    for M, olrs in spec.outer_lrs_by_workers:
        if M in spec.workers and M != spec.tune_workers:
            plan.by_workers[M] = [Job("diloco", M, replace(best_diloco, outer_lr=o)) for o in olrs]
    # DP at every M: the same optimisation as at M = 1 in exact arithmetic, but each worker
    # draws from its own shard, so these see exactly the batches the methods at M see
    plan.dp_by_workers = {M: Job("dp", M, best_dp) for M in spec.workers if M > 1}
    Mt = spec.tune_workers
    hs = replace(best_diloco, inner_steps=spec.streaming_inner_steps(best_diloco.inner_steps))
    plan.streaming = [Job("streaming", Mt, hs)]
    if hs != best_diloco:  # DiLoCo at Streaming's H, to tell the cost of H from the cost of streaming
        plan.streaming.insert(0, Job("diloco", Mt, hs))
    plan.mixing = [Job("streaming-overlap", Mt, hs, codec=spec.headline_codec, mixing=a) for a in spec.overlap_mixings]
    return plan


def overlap_jobs(spec: QualitySpec, plan: Stages, head: Job) -> Stages:
    """Stage 3b/4: every codec and variant at the α the headline codec chose (``head``)."""
    plan.overlap = [head if c == spec.headline_codec else replace(head, codec=c) for c in spec.streaming_codecs]
    plan.variants = [replace(head, variant=v) for v in spec.variants]
    return plan


def sparse_tuning_jobs(spec: QualitySpec, plan: Stages, head: Job) -> Stages:
    """Stage 5a: both sparse families at the headline density, the headline's α and H."""
    codec = spec.sparse_headline
    plan.sparse_tune = {
        "sparseloco": [replace(head, codec=codec, hp=replace(head.hp, outer_lr=o, outer_momentum=0.0),
                               ef_decay=spec.sparse_decay) for o in spec.sparseloco_outer_lrs],
        "ef-nesterov": [replace(head, codec=codec, ef_decay=b) for b in spec.sparse_nesterov_decays],
    }
    return plan


def frontier_jobs(spec: QualitySpec, plan: Stages, best: dict[str, Job], head: Job, winner: Job) -> Stages:
    """Stage 5b: at each family's best (``best``), every other density and every other H;
    at every other M, the headline and the better family (``winner``)."""
    out: list[Job] = []
    for b in best.values():
        out += [replace(b, codec=c) for c in spec.sparse_codecs if c != spec.sparse_headline]
        out += [replace(b, hp=replace(b.hp, inner_steps=H)) for H in spec.frontier_inner_steps]
    for M in spec.frontier_workers:
        out += [replace(head, workers=M), replace(winner, workers=M)]
    plan.frontier = out
    return plan


def sparse_rows_jobs(plan: Stages) -> list[Job]:
    """Every job of the frontier stage: the families' tuning, the densities, H and M."""
    return [j for js in plan.sparse_tune.values() for j in js] + plan.frontier


def headline_sparse(spec: QualitySpec, plan: Stages, runs: dict[str, dict]) -> Job | None:
    """The sparse row the frontier's target is about: at M = tune_workers, the lowest loss
    among those sending ``frontier_bytes_target`` times fewer bytes than DP (seed 0; None
    if none does)."""
    ok = [j for j in sparse_rows_jobs(plan) if j.workers == spec.tune_workers
          and _bytes_ratio(runs[j.name]) >= spec.frontier_bytes_target]
    return best_of(ok, runs) if ok else None


def _bytes_ratio(rec: dict) -> float:
    sent = rec["bytes_sent_per_worker_max"]
    return rec["dp_equivalent_bytes_per_worker"] / sent if sent else 0.0


def seed_jobs(spec: QualitySpec, headline: list[Job]) -> list[Job]:
    """Stage 5: the headline jobs again with every other seed."""
    return [replace(j, seed=s) for j in headline for s in spec.seeds if s != 0]


# ---- running ------------------------------------------------------------------------

def _train_job(name: str, overrides: list[str], work_dir: str, reuse: bool = False) -> dict:
    """Train one run (in a pool process); return its record. The trainer's log lines go
    to ``work_dir/name.log``; checkpoints are deleted (only metrics are needed). With
    ``reuse``, a finished run already in ``work_dir`` whose resolved config is this one's
    is read back instead of trained again."""
    from farsync.train.config import build_config, to_toml
    from farsync.train import train

    cfg = build_config(None, overrides + [f"--train.run_dir={work_dir}", f"--train.name={name}"])
    run_dir = os.path.join(work_dir, name)
    if reuse and _finished_with(run_dir, to_toml(cfg)):
        with open(os.path.join(run_dir, "summary.json")) as f:
            return {**_record(name, cfg, json.load(f), run_dir), "reused": True}
    os.makedirs(work_dir, exist_ok=True)
    with open(os.path.join(work_dir, f"{name}.log"), "w") as logf, contextlib.redirect_stderr(logf):
        summary = train(cfg)
    shutil.rmtree(os.path.join(summary["run_dir"], "checkpoints"), ignore_errors=True)
    return {**_record(name, cfg, summary, summary["run_dir"]), "reused": False}


def _finished_with(run_dir: str, config_toml: str) -> bool:
    """A run directory holding a finished run (summary.json) of exactly this config."""
    try:
        with open(os.path.join(run_dir, "config.toml")) as f:
            same = f.read() == config_toml
    except FileNotFoundError:
        return False
    return same and os.path.exists(os.path.join(run_dir, "summary.json"))


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
            elif row["kind"] == "eval":
                evals.append(row)
    curve = []
    for row in evals:
        # the final eval follows finish(), which lands fragments still in flight: use the
        # summary's total there, the train row of the same step elsewhere
        b = summary["bytes_sent_total"] if row["step"] == cfg.train.steps else bytes_at[row["step"]]
        curve.append({"step": row["step"], "tokens": row["tokens"], "eval_loss": row["eval_loss"],
                      "bytes_sent_total": int(round(b))})
    return {
        "name": name,
        "workers": M,
        "parameters": summary["parameters"],
        "steps": summary["steps"],
        "tokens": summary["tokens"],
        "final_eval_loss": summary["final_eval_loss"],
        "bytes_sent_total": summary["bytes_sent_total"],
        "bytes_sent_per_worker_max": max(summary["bytes_sent_per_worker"]),
        "dp_equivalent_bytes_per_worker": summary["dp_equivalent_bytes_per_worker"],
        "peak_bytes_per_sync": summary["peak_bytes_per_sync"],
        "sync_events": summary["sync_events"],
        "wall_seconds": summary["wall_seconds"],
        "algo": dataclasses.asdict(cfg.algo),
        "optim": dataclasses.asdict(cfg.optim),
        "curve": curve,
    }


def _cost(job: Job) -> float:
    """Relative wall time of a run, to start the longest first (order only): small
    per-worker batches run less efficiently."""
    return 1.0 + 0.08 * job.workers


def job_pool(jobs: int):
    """Where the runs train: ``jobs`` processes (spawned: no fork of a process holding torch
    threads), started once and kept for every stage — a fresh one spends seconds importing
    torch —, or this process (None) for one job at a time."""
    if jobs <= 1:
        return contextlib.nullcontext(None)
    return ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))


def run_jobs(jobs: list[Job], spec: QualitySpec, work_dir: str, pool: ProcessPoolExecutor | None,
             done: dict[str, dict], log: Log, reuse: bool = False) -> None:
    """Train every job not yet in ``done`` (keyed by name) in ``pool`` (:func:`job_pool`);
    add the records to it."""
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
        log(f"  [{count}/{len(order)}] {rec['name']:<52} eval loss {rec['final_eval_loss']:.4f}  "
            f"{rec['wall_seconds']:.0f} s" + ("  (reused)" if rec["reused"] else ""))

    if pool is None:
        for j in order:
            finished(_train_job(j.name, j.overrides(spec), work_dir, reuse))
        return
    futures = [pool.submit(_train_job, j.name, j.overrides(spec), work_dir, reuse) for j in order]
    for fut in as_completed(futures):
        finished(fut.result())


def _loss(rec: dict) -> float:
    v = rec["final_eval_loss"]
    return v if v is not None and math.isfinite(v) else math.inf


def best_of(jobs: list[Job], runs: dict[str, dict]) -> Job:
    """The job with the lowest final eval loss (ties: the first)."""
    return min(jobs, key=lambda j: _loss(runs[j.name]))


# ---- the report ---------------------------------------------------------------------

def _seed_stats(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values),
            "spread": max(values) - min(values)}


def seed_gaps(runs: dict[str, dict], job: Job, dp_job: Job, seeds: tuple[int, ...]) -> list[float]:
    """The job's gap to ``dp_job`` (%), seed by seed."""
    return [100.0 * (runs[replace(job, seed=s).name]["final_eval_loss"] /
                     runs[replace(dp_job, seed=s).name]["final_eval_loss"] - 1.0) for s in seeds]


def gap_row(spec: QualitySpec, runs: dict[str, dict], job: Job, dp_job: Job, seeds: tuple[int, ...]) -> dict:
    """One row of gap_table: the job's mean loss over ``seeds`` against DP's on the same
    seeds (the gap is taken per seed, then averaged)."""
    recs = [runs[replace(job, seed=s).name] for s in seeds]
    dps = [runs[replace(dp_job, seed=s).name] for s in seeds]
    gaps = seed_gaps(runs, job, dp_job, seeds)
    r0 = recs[0]
    sent = r0["bytes_sent_per_worker_max"]
    dp_bytes = r0["dp_equivalent_bytes_per_worker"]
    eval_loss = _seed_stats([r["final_eval_loss"] for r in recs])
    return {
        "size": spec.size,
        "parameters": r0["parameters"],
        "tokens": r0["tokens"],
        "method": job.method,
        "workers": job.workers,
        "codec": job.codec,
        "variant": job.variant,
        "mixing": job.mixing,
        "family": job.family,
        "error_feedback_decay": job.ef_decay,
        "eval_loss": eval_loss["mean"],
        "dp_eval_loss": _seed_stats([d["final_eval_loss"] for d in dps])["mean"],
        "gap_pct": sum(gaps) / len(gaps),
        "bytes_ratio": (dp_bytes / sent) if sent and dp_bytes else None,
        "seeds": list(seeds),
        "eval_loss_by_seed": [r["final_eval_loss"] for r in recs],
        "gap_pct_by_seed": gaps,
        "gap_pct_spread": max(gaps) - min(gaps),
        "hparams": asdict(job.hp),
        "peak_bytes_per_sync": r0["peak_bytes_per_sync"],
        "bytes_sent_total": r0["bytes_sent_total"],
        "sync_events": r0["sync_events"],
        "scaling_law_gap_pct": scaling_law_gap_pct(job.workers, r0["parameters"]) if job.method == "diloco" else None,
        "paper_35m_gap_pct": PAPER_35M_GAP_PCT.get(job.workers) if job.method == "diloco" else None,
        "runs": [r["name"] for r in recs],
    }


def _sweep(jobs: list[Job], runs: dict[str, dict]) -> dict:
    grid = [{"hparams": asdict(j.hp), "workers": j.workers, "mixing": j.mixing, "error_feedback_decay": j.ef_decay,
             "run": j.name, "final_eval_loss": runs[j.name]["final_eval_loss"]} for j in jobs]
    best = best_of(jobs, runs)
    return {"grid": grid, "best": {"hparams": asdict(best.hp), "run": best.name,
                                   "final_eval_loss": runs[best.name]["final_eval_loss"]}}


def frontier_points(rows: list[dict], M: int) -> list[dict]:
    """Every method at M on the frontier: the loss gap to DP against DP's bytes ÷ its own."""
    return [{"method": r["method"], "codec": r["codec"], "family": r["family"], "variant": r["variant"],
             "inner_steps": r["hparams"].get("inner_steps"), "error_feedback_decay": r["error_feedback_decay"],
             "bytes_ratio": r["bytes_ratio"], "gap_pct": r["gap_pct"], "seeds": r["seeds"]}
            for r in rows if r["workers"] == M and r["method"] != "dp" and r["bytes_ratio"]]


def frontier_targets(spec: QualitySpec, rows: list[dict], head: dict, sparse_head: Job | None) -> dict:
    """The frontier's targets: ≥ frontier_bytes_target× fewer bytes than DP at M =
    tune_workers within 1 point of the headline's gap; stretch: 3× that ratio at that gap,
    or that ratio at a gap below the headline's."""
    M, target, limit = spec.tune_workers, spec.frontier_bytes_target, head["gap_pct"] + 1.0
    sparse = [r for r in rows if r["family"] is not None and r["workers"] == M]
    chosen = next((r for r in sparse if sparse_head is not None and r["runs"][0] == sparse_head.name), None)
    far = [r for r in sparse if r["bytes_ratio"] and r["bytes_ratio"] >= 3 * target]
    best_far = min(far, key=lambda r: r["gap_pct"]) if far else None
    what = f"the best sparse row at ≥ {target:g}× fewer bytes than DP (M = {M}, {len(spec.seeds)} seeds)"
    return {
        "sparse_bytes_within_1pt_of_headline": {
            "what": f"{what}: gap ≤ Streaming + overlap + {spec.headline_codec}'s + 1 point",
            "value": None if chosen is None else chosen["gap_pct"], "threshold": limit,
            "bytes_ratio": None if chosen is None else chosen["bytes_ratio"],
            "met": chosen is not None and chosen["gap_pct"] <= limit},
        "stretch_sparse_3x_bytes": {
            "what": f"Stretch: a sparse row at ≥ {3 * target:g}× fewer bytes within that gap (1 seed)",
            "value": None if best_far is None else best_far["gap_pct"], "threshold": limit,
            "bytes_ratio": None if best_far is None else best_far["bytes_ratio"],
            "met": best_far is not None and best_far["gap_pct"] <= limit},
        "stretch_sparse_below_headline": {
            "what": f"Stretch: {what} below the headline's gap",
            "value": None if chosen is None else chosen["gap_pct"], "threshold": head["gap_pct"],
            "bytes_ratio": None if chosen is None else chosen["bytes_ratio"],
            "met": chosen is not None and chosen["gap_pct"] < head["gap_pct"]},
    }


def build_report(spec: QualitySpec, plan: Stages, runs: dict[str, dict], runtime_s: float, quick: bool,
                 command: str, jobs: int = 2) -> dict:
    """Everything quality.json holds, from the finished runs."""
    dp = {1: best_of(plan.tune_dp, runs), **plan.dp_by_workers}
    diloco = {spec.tune_workers: best_of(plan.tune_diloco, runs)}
    for M, js in plan.by_workers.items():
        diloco[M] = best_of(js, runs)
    all_seeds = tuple(spec.seeds)
    head = best_of(plan.mixing, runs)

    def row(job: Job, seeds: tuple[int, ...]) -> dict:
        """Against DP at the job's own M (the same shards and batches), and at M = 1."""
        r = gap_row(spec, runs, job, dp[job.workers], seeds)
        gaps = seed_gaps(runs, job, dp[1], seeds)
        r["gap_pct_vs_dp_m1"] = sum(gaps) / len(gaps)
        return r

    rows = [row(dp[M], all_seeds) for M in sorted(dp)]
    rows += [row(diloco[M], all_seeds) for M in sorted(diloco)]
    for j in plan.streaming + plan.overlap:
        rows.append(row(j, all_seeds if j == head else (0,)))
        if j.method == "diloco":  # DiLoCo again at Streaming's H (see later_jobs)
            rows[-1]["variant"] = AT_STREAMING_H
    rows += [row(j, (0,)) for j in plan.variants]
    sparse_head = headline_sparse(spec, plan, runs)
    for r in rows:
        r["frontier"] = False
    for j in sparse_rows_jobs(plan):
        rows.append({**row(j, all_seeds if j == sparse_head else (0,)), "frontier": True})
    by = {(r["method"], r["workers"], r["codec"], r["variant"]): r for r in rows if r["family"] is None}
    d4 = by[("diloco", spec.tune_workers, "fp32", None)]
    h = by[("streaming-overlap", spec.tune_workers, spec.headline_codec, None)]
    targets = {}
    if 1 in diloco:
        d1 = by[("diloco", 1, "fp32", None)]
        targets["m1_within_half_pct"] = {
            "what": "DiLoCo M = 1 within ±0.5 % of plain training (DP)", "value": d1["gap_pct"],
            "threshold": [-0.5, 0.5], "met": abs(d1["gap_pct"]) <= 0.5}
    pred = d4["scaling_law_gap_pct"]
    targets["m4_within_scaling_law"] = {
        "what": f"DiLoCo M = {spec.tune_workers} gap ≤ the scaling-law prediction at {d4['parameters']:,} "
                f"parameters and ≤ 4 %", "value": d4["gap_pct"], "threshold": min(pred, 4.0) if pred else 4.0,
        "met": d4["gap_pct"] <= (min(pred, 4.0) if pred else 4.0)}
    targets["headline_within_1pt_of_diloco"] = {
        "what": f"Streaming + overlap + {spec.headline_codec} gap within 1 point of DiLoCo's (M = {spec.tune_workers})",
        "value": h["gap_pct"] - d4["gap_pct"], "threshold": 1.0, "met": h["gap_pct"] - d4["gap_pct"] <= 1.0}
    targets["headline_100x_fewer_bytes"] = {
        "what": f"Streaming + overlap + {spec.headline_codec} sends ≥ 100× fewer bytes than DP",
        "value": h["bytes_ratio"], "threshold": 100, "met": bool(h["bytes_ratio"] and h["bytes_ratio"] >= 100)}
    targets["stretch_m4_within_2pct"] = {
        "what": f"Stretch: DiLoCo M = {spec.tune_workers} within 2 %", "value": d4["gap_pct"],
        "threshold": 2.0, "met": d4["gap_pct"] <= 2.0}
    targets.update(frontier_targets(spec, rows, h, sparse_head))
    reused = any(r.get("reused") for r in runs.values())
    # with reused runs, this invocation's time says nothing: estimate a run from scratch
    # as the training time of every run, ``jobs`` at a time
    runtime = sum(r["wall_seconds"] for r in runs.values()) / jobs if reused else runtime_s
    targets["runtime"] = {
        "what": f"{'--quick' if quick else 'full benchmark'} ≤ {spec.runtime_limit_s / 60:g} min on this machine",
        "value": runtime, "threshold": spec.runtime_limit_s, "met": runtime <= spec.runtime_limit_s,
        "estimated": reused}
    return {
        "benchmark": "quality",
        "quick": quick,
        "date": dt.date.today().isoformat(),
        "command": command,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": _torch_version(), "cpus": os.cpu_count()},
        "runtime_seconds": runtime_s,
        "reused_runs": sorted(n for n, r in runs.items() if r.get("reused")),
        # what training every run took, two at a time as the benchmark runs them: the
        # runtime of a run from scratch, also when this one reused earlier runs
        "train_seconds_total": sum(r["wall_seconds"] for r in runs.values()),
        "spec": asdict(spec),
        "steps": spec.steps(),
        "gap_table": rows,
        "tuning": {
            "dp": _sweep(plan.tune_dp, runs),
            "diloco": _sweep(plan.tune_diloco, runs),
            "diloco_outer_lr_by_workers": {str(M): _sweep(js, runs) for M, js in plan.by_workers.items()},
            "streaming_mixing": _sweep(plan.mixing, runs),
            **({f"sparse_{f}": _sweep(js, runs) for f, js in plan.sparse_tune.items()}),
        },
        "frontier": {str(M): frontier_points(rows, M) for M in (spec.tune_workers, *spec.frontier_workers)},
        "sparse_headline_run": None if sparse_head is None else sparse_head.name,
        "targets": targets,
        "runs": runs,
    }


def _torch_version() -> str:
    import torch

    return torch.__version__


def run_benchmark(spec: QualitySpec, out_dir: str, work_dir: str, jobs: int = 2, quick: bool = False,
                  command: str = "", log: Log | None = None, reuse: bool = False) -> dict:
    """Run every stage, write quality.json, quality.md and the plots to ``out_dir``;
    return the report. Run directories go under ``work_dir``; with ``reuse``, finished
    runs there of an unchanged config are read back instead of trained again."""
    from farsync.bench.quality_report import write_markdown, write_plots
    from farsync.train.config import build_config

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    spec.validate()
    plan = tuning_jobs(spec)
    # every configuration the plan can produce is checked before anything trains
    probe = later_jobs(spec, tuning_jobs(spec), plan.tune_dp[0].hp, plan.tune_diloco[0].hp)
    overlap_jobs(spec, probe, probe.mixing[0])
    sparse_tuning_jobs(spec, probe, probe.mixing[0])
    firsts = {f: js[0] for f, js in probe.sparse_tune.items()}
    frontier_jobs(spec, probe, firsts, probe.mixing[0], next(iter(firsts.values())))
    for j in [*plan.tune_dp, *plan.tune_diloco, *probe.dp_by_workers.values(),
              *[j for js in probe.by_workers.values() for j in js],
              *probe.streaming, *probe.mixing, *probe.overlap, *probe.variants,
              *[j for js in probe.sparse_tune.values() for j in js], *probe.frontier]:
        build_config(None, j.overrides(spec))

    with job_pool(jobs) as pool:
        t0 = time.perf_counter()
        runs: dict[str, dict] = {}
        n = len(plan.tune_dp) + len(plan.tune_diloco)
        log(f"quality: {spec.size}, {spec.parameters():,} parameters, {spec.steps()} steps of "
            f"{spec.global_batch}×{spec.seq_len} tokens; stage 1, tuning ({n} runs, {jobs} at a time)")
        run_jobs(plan.tune_dp + plan.tune_diloco, spec, work_dir, pool, runs, log, reuse)
        best_dp, best_diloco = best_of(plan.tune_dp, runs), best_of(plan.tune_diloco, runs)
        log(f"quality: tuned DP {best_dp.hp.label()}; DiLoCo (M = {spec.tune_workers}) {best_diloco.hp.label()}")

        later_jobs(spec, plan, best_dp.hp, best_diloco.hp)
        rest = [*plan.dp_by_workers.values()] + [j for js in plan.by_workers.values() for j in js] + \
            plan.streaming + plan.mixing
        log(f"quality: stages 2–3, DP and DiLoCo at M = {', '.join(map(str, plan.by_workers))}, Streaming, overlap over α "
            f"({len(rest)} runs)")
        run_jobs(rest, spec, work_dir, pool, runs, log, reuse)
        head = best_of(plan.mixing, runs)
        overlap_jobs(spec, plan, head)
        log(f"quality: overlap α {head.mixing:g}; stage 4, the other codecs and the variants at it")
        run_jobs(plan.overlap + plan.variants, spec, work_dir, pool, runs, log, reuse)

        sparse_tuning_jobs(spec, plan, head)
        tune = [j for js in plan.sparse_tune.values() for j in js]
        log(f"quality: stage 5, the sparse frontier: both families at {spec.sparse_headline} ({len(tune)} runs)")
        run_jobs(tune, spec, work_dir, pool, runs, log, reuse)
        best = {f: best_of(js, runs) for f, js in plan.sparse_tune.items()}
        winner = best_of(list(best.values()), runs)
        frontier_jobs(spec, plan, best, head, winner)
        log(f"quality: best {', '.join(f'{f}: {j.name}' for f, j in best.items())}; densities, H and M "
            f"({len(plan.frontier)} runs)")
        run_jobs(plan.frontier, spec, work_dir, pool, runs, log, reuse)

        chosen = [best_dp, *plan.dp_by_workers.values(), best_diloco] + \
            [best_of(js, runs) for js in plan.by_workers.values()] + [head]
        sparse_head = headline_sparse(spec, plan, runs)
        if sparse_head is not None:
            chosen.append(sparse_head)
        plan.seeds = seed_jobs(spec, chosen)
        log(f"quality: stage 6, seeds {', '.join(str(s) for s in spec.seeds if s)} of the headline rows "
            f"({len(plan.seeds)} runs)")
        run_jobs(plan.seeds, spec, work_dir, pool, runs, log, reuse)
        runtime = time.perf_counter() - t0

    report = build_report(spec, plan, runs, runtime, quick, command, jobs)
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


__all__ = ["FULL", "QUICK", "VARIANTS", "QualitySpec", "Hparams", "Job", "Stages", "run_benchmark", "spec_with",
           "build_report", "scaling_law_gap_pct"]
