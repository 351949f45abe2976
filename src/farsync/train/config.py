"""Typed run configuration: dataclass sections, TOML recipes, ``--section.key=value``
overrides. Every error names the key and the value given (``ConfigError``)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import tomli_w

from farsync.codec_names import ALL_CODEC_NAMES, is_sparse
from farsync.data import DataConfig
from farsync.models import MODEL_SIZES
from farsync.overrides import parse_override
from farsync.schedule import EXCHANGES, FRAGMENT_PATTERNS, SettingError, check_choice, check_schedule, wire_codec


class ConfigError(ValueError):
    """A recipe or override is wrong; the message names the key and value."""


#: algo.schedule: how workers of unequal speed are paced through a round (not to be
#: confused with the sync schedule of :mod:`farsync.schedule`, which says when each
#: fragment syncs)
PACINGS = ("lockstep", "steps", "time-budget")


def _choice(key: str, value, choices) -> None:
    """:func:`farsync.schedule.check_choice`, as a ConfigError."""
    try:
        check_choice(key, value, choices)
    except SettingError as e:
        raise ConfigError(str(e)) from None


def _at_least(pairs) -> None:
    """(key, value, low): value >= low (None: unset, an optional key)."""
    for key, value, low in pairs:
        if value is not None and value < low:
            raise ConfigError(f"{key} must be >= {low} (got {value})")


def _positive(pairs) -> None:
    for key, value in pairs:
        if not value > 0:
            raise ConfigError(f"{key} must be > 0 (got {value})")


@dataclass
class ModelConfig:
    size: str = "micro"
    """Size from the ladder: nano, micro (the CPU default), tiny, mini, small, 35m, 100m,
    200m, 1b."""
    seq_len: int = 128
    """Tokens per training sequence (T)."""
    z_loss: float = 0.0
    """Coefficient of the z-loss on the log-partition (0 disables)."""
    qk_norm: bool = True
    """RMSNorm on queries and keys."""
    hf_config: str = ""
    """A transformers config.json (or a folder with one): train that causal-LM architecture
    instead of model.size, from random weights, its vocabulary set to the tokenizer's
    (pip install 'farsync[hf]'). z_loss and qk_norm do not apply."""

    def __post_init__(self) -> None:
        _choice("model.size", self.size, tuple(MODEL_SIZES))
        if self.hf_config and not os.path.exists(self.hf_config):
            raise ConfigError(f"model.hf_config: no such file or directory: {self.hf_config!r}")
        _at_least([("model.seq_len", self.seq_len, 8)])


@dataclass
class AlgoConfig:
    mode: str = "streaming"
    """dp (data-parallel baseline), diloco or streaming."""
    workers: int = 4
    """M: number of workers (replicas). Under torchrun it must equal the number of processes."""
    inner_steps: int = 20
    """H: inner steps between two syncs of a fragment."""
    fragments: int = 2
    """P: fragments, synced at staggered offsets t_p = p*H/P (streaming only)."""
    fragment_pattern: str = "strided"
    """strided (block i -> fragment i mod P) or sequential."""
    sync_delay: int = 1
    """tau: inner steps overlapped with a fragment's exchange; must be < H/P."""
    mixing: float | None = None
    """alpha in [0, 1]: local weight when a sync lands; auto (omit the key) = 0 if tau = 0, else 0.25 (the paper's is 0.5)."""
    codec: str = "fp4-e3m0"
    """Pseudo-gradient codec: fp32, bf16, int8, fp4-e3m0, fp4-e2m1, or a sparse topk{D}-{V}
    (the top 1/D of each chunk, D in 16, 32, 64, 128, values int2, fp4 or int8; use it with
    algo.error_feedback; all-gather only). dp always sends fp32."""
    codec_block_size: int | None = None
    """Values per codec scale block (sparse codecs: per chunk); auto (omit the key) = the codec's default."""
    stochastic_rounding: bool = False
    """Stochastic rounding in lossy codecs."""
    error_feedback: bool = False
    """Carry what the codec dropped from a worker's pseudo-gradient into its next one
    (error feedback; needs round-to-nearest)."""
    error_feedback_decay: float = 1.0
    """beta of error feedback, as SparseLoCo's accumulator: e <- beta*e + delta, send Q(e),
    e <- e - Q(e) (1: nothing of what was dropped is forgotten)."""
    exchange: str = "auto"
    """auto, reduce-scatter or all-gather (how a quantized mean travels)."""
    outer_lr: float = 0.7
    """Outer SGD learning rate."""
    outer_momentum: float = 0.8
    """Outer Nesterov momentum (the papers' 0.9 lost 4 % to 0.8 in the quality benchmark)."""
    outer_nesterov: bool = True
    """Nesterov's form of the outer momentum (false: plain heavy-ball momentum)."""
    compensate_weight_decay: bool = True
    """Divide the inner weight decay by the outer optimizer's steady-state gain
    outer_lr / (1 - outer_momentum): the outer momentum multiplies a pseudo-gradient that
    points the same way every round, and the decay always does (diloco/streaming only)."""
    final_average: bool = True
    """End of training: sync every fragment's last inner steps and land the final syncs as
    the workers' plain mean (no outer-momentum extrapolation in the model kept)."""
    token_weighting: bool = True
    """Weight each worker's pseudo-gradient by the tokens it trained on since its last sync
    (equal workers: the plain mean, bit for bit)."""
    participation: int = 0
    """K: workers sampled (seeded by train.seed) to contribute to each round; 0 = all M."""
    offload: bool = False
    """Keep θ_g and the outer optimizer's state in (pinned) CPU memory, not on the GPU:
    pseudo-gradients are formed, encoded and exchanged on the CPU (diloco/streaming)."""
    aggregation: str = "mean"
    """How receivers combine pseudo-gradients: mean (weighted), trimmed-mean or median
    (coordinate-wise, unweighted)."""
    outlier_factor: float = 10.0
    """Leave out a pseudo-gradient whose norm per token exceeds this many times the lower
    median of the round's (0 = no norm rule; non-finite ones are always left out)."""
    trim: float = 0.2
    """trimmed-mean: fraction of values cut at each end of every coordinate."""
    min_contributions: int = 1
    """A round with fewer pseudo-gradients kept is skipped (θ_g stays as it was)."""
    worker_speeds: str = ""
    """Relative speeds of the M workers, comma-separated (e.g. 1,1,0.5,0.25); empty = equal.
    In-process they are simulated; under torchrun a slower worker sleeps after each step."""
    schedule: str = "lockstep"
    """How workers of unequal speed share a round: lockstep (every worker takes every
    step; the fast wait for the slowest), steps (a worker trains speed/fastest of the
    steps and sits the rest out; its pseudo-gradient weighs the tokens it trained on) or
    time-budget (a worker trains a step only if it can finish it before the next sync's
    deadline, step t's being (t + 1)·algo.round_seconds/H after the start, and sits out
    the rest of the window; a worker whose step is longer than a window never trains)."""
    round_seconds: float = 0.0
    """time-budget: the wall-clock length of a round of H steps under torchrun (required
    there). In one process the clock is simulated: a round lasts the fastest worker's H
    steps and a worker of speed v takes 1/v as long per step."""
    auto: bool = False
    """Before training, measure the link between the workers and the step time, and set
    mode, inner_steps, fragments, sync_delay and codec to the setting the simulator
    predicts sends the fewest bytes at plan.target_utilization, inside the plan.* bounds
    (the choice and the alternatives go to RUN/plan.json; a resumed run keeps its plan)."""

    def __post_init__(self) -> None:
        _choice("algo.codec", self.codec, ALL_CODEC_NAMES)
        _choice("algo.exchange", self.exchange, EXCHANGES)
        _choice("algo.fragment_pattern", self.fragment_pattern, FRAGMENT_PATTERNS)
        _choice("algo.schedule", self.schedule, PACINGS)
        try:  # the schedule rules the simulator applies too (farsync.schedule)
            check_schedule(self.mode, inner_steps=self.inner_steps, fragments=self.fragments,
                           sync_delay=self.sync_delay, mixing=self.mixing, prefix="algo.")
        except SettingError as e:
            raise ConfigError(str(e)) from None
        _at_least([("algo.workers", self.workers, 1), ("algo.codec_block_size", self.codec_block_size, 1)])
        _positive([("algo.outer_lr", self.outer_lr)])
        if not 0.0 <= self.outer_momentum < 1.0:
            raise ConfigError(f"algo.outer_momentum must be in [0, 1) (got {self.outer_momentum})")
        if self.error_feedback and self.stochastic_rounding:
            raise ConfigError("algo.error_feedback needs round-to-nearest: set algo.stochastic_rounding=false")
        if not 0.0 <= self.error_feedback_decay <= 1.0:
            raise ConfigError(f"algo.error_feedback_decay must be in [0, 1] (got {self.error_feedback_decay})")
        if self.mode != "dp":
            from farsync.comm.exchange import check_sparse_method

            try:
                check_sparse_method(self.codec, is_sparse(self.codec), self.exchange, "algo.exchange")
            except ValueError as e:
                raise ConfigError(str(e)) from None
            if is_sparse(self.codec) and self.stochastic_rounding:
                raise ConfigError(f"algo.codec={self.codec} rounds to nearest only: set algo.stochastic_rounding=false")
        speeds = self.speeds()
        if self.mode == "dp" and (len(set(speeds)) > 1 or self.schedule != "lockstep"):
            raise ConfigError("algo.worker_speeds / algo.schedule need rounds: use mode diloco or streaming")
        if self.round_seconds < 0:
            raise ConfigError(f"algo.round_seconds must be >= 0 (got {self.round_seconds})")
        if not 0 <= self.participation <= self.workers:
            raise ConfigError(f"algo.participation must be in [0, {self.workers}] (0 = all workers; got {self.participation})")
        if self.outlier_factor and self.outlier_factor <= 1:
            raise ConfigError(f"algo.outlier_factor must be > 1, or 0 for no norm rule (got {self.outlier_factor})")
        try:
            self.make_aggregation()
        except ValueError as e:
            raise ConfigError(f"algo.{e}") from None

    def speeds(self) -> list[float]:
        """worker_speeds as numbers, one per worker (all 1.0 when empty)."""
        if not self.worker_speeds.strip():
            return [1.0] * self.workers
        try:
            speeds = [float(x) for x in self.worker_speeds.split(",")]
        except ValueError:
            raise ConfigError(f"algo.worker_speeds must be comma-separated numbers (got {self.worker_speeds!r})") from None
        if len(speeds) != self.workers or not all(v > 0 for v in speeds):
            raise ConfigError(f"algo.worker_speeds needs {self.workers} positive numbers, one per worker "
                              f"(got {self.worker_speeds!r})")
        return speeds

    def make_aggregation(self):
        from farsync.comm.exchange import Aggregation

        return Aggregation(rule=self.aggregation, outlier_factor=self.outlier_factor or None, trim=self.trim,
                           min_contributions=self.min_contributions)

    @property
    def wire_codec(self) -> str:
        """The codec exchanges really use (dp: fp32)."""
        return wire_codec(self.mode, self.codec)


@dataclass
class OptimConfig:
    lr: float = 4e-3
    """Peak inner AdamW learning rate."""
    weight_decay: float = 0.01
    """Inner AdamW weight decay (DiLoCo's is compensated: see algo.compensate_weight_decay)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of lr."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0 disables)."""

    def __post_init__(self) -> None:
        _positive([("optim.lr", self.lr)])
        _at_least([("optim.warmup_steps", self.warmup_steps, 0), ("optim.weight_decay", self.weight_decay, 0.0),
                   ("optim.grad_clip", self.grad_clip, 0.0)])
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio})")


@dataclass
class TrainConfig:
    steps: int = 1560
    """Inner steps per worker."""
    batch_size: int = 4
    """Sequences per worker per step (B)."""
    seed: int = 0
    """Seeds the model init, the data order and stochastic rounding."""
    eval_every: int = 156
    """Evaluate the global model every this many steps (and at the end)."""
    eval_batches: int = 32
    """Held-out batches per evaluation (the same for every method)."""
    log_every: int = 20
    """Write a metrics.jsonl row every this many steps."""
    checkpoint_every: int = 520
    """Checkpoint every this many steps (and at the end, and on Ctrl-C); 0 = only then.
    A run of train.steps or fewer steps checkpoints once half-way instead (so that a
    killed short run can still be resumed)."""
    keep_checkpoints: int = 2
    """Checkpoints kept: the newest and the ones before it, so a resume that finds the
    newest damaged falls back to the previous one."""
    run_dir: str = "runs"
    """Parent folder of run directories."""
    name: str = ""
    """Run name: a folder under train.run_dir, not a path (default: mode-codec-timestamp).
    farsync train refuses a name whose folder already holds a run (see train.overwrite)."""
    overwrite: bool = False
    """farsync train: replace what the run directory train.run_dir/train.name holds (by
    default an existing run directory is refused: resume it with --resume, or choose
    another train.name). Never saved in config.toml."""
    device: str = "auto"
    """auto (cuda if available), cpu or cuda."""
    threads: int = 1
    """torch intra-op threads; 0 = torch's default. 1 by default: the small CPU models' matmuls
    do not scale (the default run took 117 s on 1 thread and ran ~4× slower on 2 threads
    while another process used the second core); set 0 for larger models."""
    fault: str = ""
    """Fault injection: train.faulty_worker's pseudo-gradients go out corrupted every
    round, unknown to it: nan, or scale:FACTOR (e.g. scale:1000); or leave:STEP, it
    stops contributing from the sync after schedule step STEP on. Empty = none."""
    faulty_worker: int = 1
    """Which worker train.fault corrupts."""
    faulty_rank: int = -1
    """A worker that is a site of several ranks: only this rank of train.faulty_worker
    corrupts what it sends (its shard); -1 = every rank."""
    launch: str = "auto"
    """How the simulated workers run when farsync train starts them (not under torchrun):
    inprocess (one after another, in this process), processes (one local process each,
    over gloo: the torchrun path, the same numbers), or auto (processes when there are 2
    or more cores and M >= 2 equal workers on the CPU; it says what it picked)."""
    progress: bool = True
    """Show a progress bar (rank 0 only)."""
    tensorboard: bool = False
    """Also log the metrics.jsonl figures to TensorBoard (RUN_DIR/tensorboard; rank 0;
    pip install 'farsync[tensorboard]')."""
    wandb: str = ""
    """Also log them to Weights & Biases: offline (files under RUN_DIR/wandb, sync later)
    or online; empty = off (rank 0; pip install 'farsync[wandb]')."""

    def __post_init__(self) -> None:
        from farsync.train.loggers import WANDB_MODES, check_available

        _choice("train.device", self.device, ("auto", "cpu", "cuda"))
        _choice("train.launch", self.launch, ("auto", "inprocess", "processes"))
        _at_least([("train.steps", self.steps, 1), ("train.batch_size", self.batch_size, 1),
                   ("train.eval_every", self.eval_every, 1), ("train.eval_batches", self.eval_batches, 1),
                   ("train.log_every", self.log_every, 1), ("train.checkpoint_every", self.checkpoint_every, 0),
                   ("train.threads", self.threads, 0), ("train.keep_checkpoints", self.keep_checkpoints, 1)])
        self._check_name()
        if self.wandb not in WANDB_MODES:
            raise ConfigError(f"train.wandb must be offline, online, or empty for off (got {self.wandb!r})")
        try:
            check_available(self.tensorboard, self.wandb)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.fault:
            from farsync.comm.faults import parse_fault

            try:
                parse_fault(self.fault)
            except ValueError as e:
                raise ConfigError(f"train.{e}") from None

    def checkpoint_interval(self) -> int:
        """Steps between two regular checkpoints (0: none but the last and Ctrl-C's):
        train.checkpoint_every, or half the run when that is not shorter than the run."""
        every, steps = self.checkpoint_every, self.steps
        if every and every >= steps:
            return steps // 2
        return every

    def _check_name(self) -> None:
        """train.name is one folder under train.run_dir: no separators, no . or .."""
        name = self.name
        if name and (name in (".", "..") or "/" in name or "\\" in name or os.sep in name or name != name.strip()
                     or "\0" in name):
            raise ConfigError(f"train.name must be a plain folder name under train.run_dir, not a path (got {name!r}); "
                              "set train.run_dir to put runs elsewhere")


@dataclass
class ElasticConfig:
    enabled: bool = False
    """Elastic run on torchft: workers may die, hang, restart or join mid-run (one
    process per worker, each started on its own; see README, "When machines fail").
    pip install 'farsync[elastic]'."""
    worker: int = -1
    """This process's stable worker id in [0, algo.workers): its data shard and its
    place in the membership (not a rank; the same after a restart). -1 = $FARSYNC_WORKER."""
    lighthouse: str = ""
    """The Lighthouse's address, http://HOST:PORT (`farsync lighthouse`); empty =
    $TORCHFT_LIGHTHOUSE."""
    host: str = ""
    """This worker's address as the other workers reach it; empty = its hostname."""
    timeout_s: float = 300.0
    """Every collective's timeout: a peer that hangs (or a link that stalls) longer is
    dropped from the round. 300 s: 6x the 50 s a 4-bit 1B-parameter fragment (P = 4,
    62 MB) takes at 10 Mbit/s, and 6x shorter than gloo's default of 30 min."""
    connect_timeout_s: float = 15.0
    """How long setting up a sync's group may take (every member reaching the others):
    a worker lost just after a sync's membership was decided is given up on after
    this. Raise it for links with a round-trip time of seconds."""
    quorum_timeout_s: float = 900.0
    """How long a worker waits for a round among at least elastic.min_workers workers
    before giving up with an error."""
    min_workers: int = 1
    """Fewest live workers to commit a round with."""
    join_timeout_s: float = 60.0
    """At start-up, how long to wait for all algo.workers workers before starting
    with those present (the others join when they come)."""
    secret_file: str = ""
    """A file holding the run's shared secret (at least 16 bytes; the same on every
    worker): each worker proves it (HMAC) in every sync and every heal, and one that
    cannot is refused. Empty = $FARSYNC_ELASTIC_SECRET, or none (nothing authenticated).
    Nothing is encrypted either way."""

    def __post_init__(self) -> None:
        _positive([(f"elastic.{k}", getattr(self, k)) for k in ("timeout_s", "connect_timeout_s", "quorum_timeout_s",
                                                                 "join_timeout_s")])
        if self.secret_file and not os.path.isfile(self.secret_file):
            raise ConfigError(f"elastic.secret_file: no such file: {self.secret_file!r}")


@dataclass
class PlanConfig:
    target_utilization: float = 0.95
    """algo.auto: the compute utilization (0, 1] the chosen setting must be predicted to reach."""
    min_inner_steps: int = 10
    """algo.auto: smallest H considered (the quality benchmark validated 10-20)."""
    max_inner_steps: int = 20
    """algo.auto: largest H considered (H 30 lost 2 % of loss at M = 4 in the quality benchmark)."""
    max_sync_delay: int = 1
    """algo.auto: largest τ considered (the quality benchmark validated 0 and 1)."""
    max_fragments: int = 0
    """algo.auto: largest P considered; 0 = the model's block count."""
    codecs: str = "fp4-e3m0,int8,bf16,fp32"
    """algo.auto: codecs considered, comma-separated (all matched fp32's loss in the quality benchmark)."""
    bandwidth_mbit: float = 0.0
    """algo.auto: plan for this link (Mbit/s per worker each way) instead of measuring it; 0 = measure."""
    rtt_ms: float = 0.0
    """algo.auto with plan.bandwidth_mbit: the link's round-trip time, ms."""
    probe_seconds: float = 0.25
    """algo.auto: the link probe doubles its exchange size until one lasts this long."""
    links: str = "shared"
    """algo.auto with sites of R ranks (R streams per worker): shared = the R streams share the
    site's link (plan.bandwidth_mbit is the site's), per-rank = every rank has a link of its own
    (plan.bandwidth_mbit is each rank's). A measured link predicts the same either way (docs/PLANNING.md)."""

    def __post_init__(self) -> None:
        try:
            self.region()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _choice("plan.links", self.links, ("shared", "per-rank"))  # farsync.sim.LINKS
        if not 0 < self.target_utilization <= 1:
            raise ConfigError(f"plan.target_utilization must be in (0, 1] (got {self.target_utilization})")
        _at_least([("plan.bandwidth_mbit", self.bandwidth_mbit, 0.0), ("plan.rtt_ms", self.rtt_ms, 0.0)])
        _positive([("plan.probe_seconds", self.probe_seconds)])

    def region(self):
        """The bounds as a :class:`farsync.plan.SafeRegion` (ValueError naming a bad key)."""
        from farsync.plan.choose import SafeRegion

        return SafeRegion(self.min_inner_steps, self.max_inner_steps, self.max_sync_delay, self.max_fragments,
                          tuple(c.strip() for c in self.codecs.split(",") if c.strip()))


@dataclass
class FederatedConfig:
    rounds: int = 0
    """Rounds of the federation (`farsync federate`); 0 = train.steps / algo.inner_steps. Clients
    are algo.workers data shards, algo.participation of them sampled per round (0 = all online)."""
    round_timeout_s: float = 600.0
    """The longest a round waits (and its messages' TTL): what has not come back by then is left
    out. The first round after the server starts waits this long; later ones the adaptive deadline."""
    deadline_factor: float = 3.0
    """A round's deadline is this many times the median time the last federated.deadline_window
    rounds took to get their replies, within [federated.deadline_floor_s, federated.round_timeout_s];
    0 = every round waits federated.round_timeout_s."""
    deadline_floor_s: float = 10.0
    """The adaptive deadline is never shorter than this (Flower's polling adds seconds to a reply)."""
    deadline_window: int = 5
    """Rounds whose reply times set the adaptive deadline (the most recent ones)."""
    min_clients: int = 1
    """A round starts once this many clients are online (and one of them is not cooling down)."""
    wait_clients_s: float = 600.0
    """How long the server waits for min_clients before it gives up with an error."""
    cooldown_s: float = 60.0
    """A client that missed a deadline sits out this long (Flower drops a dead one after ~60 s)."""
    keep_rounds: int = 8
    """Encoded means the server keeps for clients that catch up; one further behind gets θ_g in full."""

    def __post_init__(self) -> None:
        _at_least([("federated.rounds", self.rounds, 0), ("federated.min_clients", self.min_clients, 1),
                   ("federated.keep_rounds", self.keep_rounds, 1), ("federated.cooldown_s", self.cooldown_s, 0.0)])
        _positive([("federated.round_timeout_s", self.round_timeout_s), ("federated.wait_clients_s", self.wait_clients_s)])
        if self.deadline_factor != 0 and not self.deadline_factor >= 1:
            raise ConfigError(f"federated.deadline_factor must be 0 (off) or >= 1 (got {self.deadline_factor})")
        _at_least([("federated.deadline_floor_s", self.deadline_floor_s, 0.0),
                   ("federated.deadline_window", self.deadline_window, 1)])


@dataclass
class SiteConfig:
    parallel: str = "ddp"
    """When a worker is a site of R ranks (torchrun started W x R processes for algo.workers
    = W): how its ranks train as one replica. ddp: every rank holds the whole model, each
    inner step averages gradients over the R ranks, and the mean pseudo-gradient's shards
    are gathered back inside the site; fsdp: parameters, gradients and AdamW state are
    sharded over the R ranks (FSDP2 fully_shard), each rank exchanging its own shard and
    gathering nothing. Ignored with one rank per worker."""

    def __post_init__(self) -> None:
        _choice("site.parallel", self.parallel, SITE_PARALLELS)


#: site.parallel: how a site's ranks train as one replica
SITE_PARALLELS = ("ddp", "fsdp")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    site: SiteConfig = field(default_factory=SiteConfig)

    def validate(self) -> None:
        """The checks across sections (each section checks its own keys when it is made);
        messages name the flag to change."""
        _check_fault(self)
        _check_elastic(self)
        _check_auto(self)

    def inner_weight_decay(self) -> float:
        """The inner optimizer's weight decay: optim.weight_decay, compensated for the
        outer gain when algo.compensate_weight_decay (see :func:`outer_gain`)."""
        a = self.algo
        if a.mode == "dp" or not a.compensate_weight_decay:
            return self.optim.weight_decay
        return self.optim.weight_decay / outer_gain(a.outer_lr, a.outer_momentum)

    def strategy_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`farsync.algorithms.make_strategy` (which drops
        what data-parallel does not use)."""
        a = self.algo
        return dict(
            mode=a.mode, workers=a.workers, exchange=a.exchange, seed=self.train.seed,
            inner_steps=a.inner_steps, fragments=a.fragments, fragment_pattern=a.fragment_pattern,
            sync_delay=a.sync_delay, mixing=a.mixing, codec=a.codec, codec_block_size=a.codec_block_size,
            stochastic_rounding=a.stochastic_rounding, error_feedback=a.error_feedback,
            error_feedback_decay=a.error_feedback_decay, outer_lr=a.outer_lr,
            outer_momentum=a.outer_momentum, outer_nesterov=a.outer_nesterov, final_average=a.final_average,
            total_steps=self.train.steps,
            aggregation=a.make_aggregation(), token_weighting=a.token_weighting,
            participation=a.participation or None, participation_seed=self.train.seed,
            offload=a.offload,
        )


def _check_fault(cfg: Config) -> None:
    """train.fault names a worker of the run."""
    if cfg.train.fault and not 0 <= cfg.train.faulty_worker < cfg.algo.workers:
        raise ConfigError(f"train.faulty_worker must be a worker in [0, {cfg.algo.workers - 1}] "
                          f"(got {cfg.train.faulty_worker})")


def _check_elastic(cfg: Config) -> None:
    """An elastic run has rounds, nothing in flight at a sync, and a worker id and
    quorum that fit algo.workers."""
    a, e = cfg.algo, cfg.elastic
    if not e.enabled:
        return
    if a.mode == "dp":
        raise ConfigError("elastic.enabled needs rounds: use mode diloco or streaming")
    if a.sync_delay:
        raise ConfigError(f"elastic.enabled needs algo.sync_delay = 0 (got {a.sync_delay}): a worker "
                          "joins at a sync with nothing else in flight")
    if a.schedule == "time-budget":
        raise ConfigError("elastic.enabled works with algo.schedule lockstep or steps")
    if e.worker >= a.workers:
        raise ConfigError(f"elastic.worker must be in [0, {a.workers - 1}] (got {e.worker})")
    if not 1 <= e.min_workers <= a.workers:
        raise ConfigError(f"elastic.min_workers must be in [1, {a.workers}] (got {e.min_workers})")


def _check_auto(cfg: Config) -> None:
    """algo.auto plans a link between workers, once, before training."""
    if not cfg.algo.auto:
        return
    if cfg.elastic.enabled:
        raise ConfigError("algo.auto does not work with elastic.enabled: plan once (farsync plan), "
                          "then set algo.inner_steps/fragments/sync_delay/codec yourself")
    if cfg.algo.workers < 2:
        raise ConfigError("algo.auto needs algo.workers >= 2: one worker has no link to plan for")


#: section name -> its dataclass
SECTIONS: dict[str, type] = typing.get_type_hints(Config)


def outer_gain(outer_lr: float, outer_momentum: float) -> float:
    """How much (Nesterov) momentum SGD multiplies a gradient that is the same every step,
    once the momentum has built up: lr·(1 + μ/(1 − μ)) = lr/(1 − μ). 1 for plain averaging
    (lr 1, no momentum); 7 for the papers' lr 0.7, momentum 0.9."""
    return outer_lr / (1.0 - outer_momentum)

#: How the command line spells "the default" for an optional key (TOML omits the key).
AUTO = "auto"



def _coerce(key: str, raw: Any, typ: Any, from_text: bool) -> Any:
    """Convert ``raw`` to the field type ``typ``; text comes from the command line."""
    if isinstance(typ, str):
        typ = {"int": int, "float": float, "bool": bool, "str": str}.get(typ, typ)
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [t for t in typing.get_args(typ) if t is not type(None)]
        typ = args[0]
        if raw is None or (from_text and str(raw).strip().lower() == AUTO):
            return None  # an optional key: None (TOML: key omitted; CLI: "auto") = the default
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        if from_text and str(raw).lower() in ("true", "1", "yes", "on"):
            return True
        if from_text and str(raw).lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key} must be true or false (got {raw!r})")
    if typ is int:
        if isinstance(raw, bool):
            raise ConfigError(f"{key} must be an integer (got {raw!r})")
        if isinstance(raw, int):
            return raw
        if from_text:
            try:
                return int(str(raw).replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key} must be an integer (got {raw!r})")
    if typ is float:
        value = None
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            value = float(raw)
        elif from_text:
            try:
                value = float(raw)
            except ValueError:
                pass
        if value is None:
            raise ConfigError(f"{key} must be a number (got {raw!r})")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number (got {raw!r})")
        return value
    if typ is str:
        if isinstance(raw, str):
            return raw
        raise ConfigError(f"{key} must be a string (got {raw!r})")
    raise ConfigError(f"{key}: unsupported type {typ}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def build_config(recipe: dict[str, Any] | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults ← recipe (parsed TOML) ← ``section.key=value`` overrides, validated."""
    values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for section, body in (recipe or {}).items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown recipe section [{section}]; sections are: {', '.join(SECTIONS)}")
        if not isinstance(body, dict):
            raise ConfigError(f"[{section}] must be a table of keys (got {body!r})")
        types_ = _field_types(SECTIONS[section])
        for key, raw in body.items():
            if key not in types_:
                raise ConfigError(f"unknown key {section}.{key}; [{section}] has: {', '.join(types_)}")
            values[section][key] = _coerce(f"{section}.{key}", raw, types_[key], from_text=False)
    for item in overrides or []:
        try:
            section, key, raw = parse_override(item)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        dotted = f"{section}.{key}"
        if section not in SECTIONS:
            raise ConfigError(f"unknown key {dotted} (sections are: {', '.join(SECTIONS)})")
        types_ = _field_types(SECTIONS[section])
        if key not in types_:
            raise ConfigError(f"unknown key {dotted}; [{section}] has: {', '.join(types_)}")
        values[section][key] = _coerce(dotted, raw, types_[key], from_text=True)
    try:
        cfg = Config(**{s: SECTIONS[s](**v) for s, v in values.items()})
    except ConfigError:
        raise
    except ValueError as e:  # section __post_init__ checks (data.*)
        raise ConfigError(str(e)) from None
    cfg.validate()
    return cfg


def load_recipe(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"recipe: no such file: {path!r}")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"recipe {path!r} is not valid TOML: {e}") from None


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


#: the [algo] keys data-parallel uses; mode dp's config.toml omits the others (H, P, τ,
#: the codec, the outer optimizer, ...: what only DiLoCo has), as they do not apply
DP_ALGO_KEYS = ("mode", "workers", "exchange", "worker_speeds", "schedule", "auto")


def to_toml(cfg: Config) -> str:
    """The config as TOML; keys left at None ("auto") are omitted, as a recipe would, and
    so are train.overwrite (a saved config never replaces a run) and, for mode dp, the
    [algo] keys only DiLoCo uses."""
    d = {s: {k: v for k, v in body.items() if v is not None} for s, body in to_dict(cfg).items()}
    d["train"].pop("overwrite", None)
    head = ""
    if cfg.algo.mode == "dp":
        d["algo"] = {k: v for k, v in d["algo"].items() if k in DP_ALGO_KEYS}
        head = "# mode dp: the [algo] keys only DiLoCo uses (inner_steps, fragments, codec, ...) do not apply; omitted\n"
    return head + tomli_w.dumps(d)


def field_help() -> dict[str, str]:
    """``section.key`` → the attribute docstring written under the field."""
    out: dict[str, str] = {}
    for section in SECTIONS:
        cls = SECTIONS[section]
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                out[f"{section}.{node.target.id}"] = " ".join(nxt.value.value.split())
    return out
