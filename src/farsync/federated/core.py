"""Federated DiLoCo (Photon): one server holds θ_g and the outer optimizer; clients train.

No transport here: :class:`Server` and :class:`Client` exchange plain Python objects
(:class:`Task`, :class:`Reply`), so the same code runs in one process
(:func:`simulate_federation`) and under Flower (:mod:`farsync.federated.flower`), and the
two give the same θ_g bit for bit (tested). The outer step and the participation sample
are those of every farsync run (:mod:`farsync.algorithms.outer`), so a federation equals
the all-to-all DiLoCo run of the same schedule (tested, with an fp32 codec: the server
re-encodes the mean it sends back, which all-to-all all-gather does not).

A round r:

1. the server samples K of the clients online (seeded by (seed, r)) and sends each a
   :class:`Task`: the round, the inner steps to train, and the *downlink* that brings the
   client's copy of θ_g up to date: the encoded mean pseudo-gradients of the rounds it
   missed (each a codec payload, replayed through the same outer step the server took),
   or, for a client further behind than the server keeps (or new), θ_g and the outer
   optimizer's state in fp32;
2. a client loads its state (inner optimizer, data position, θ_g and outer state) from its
   state folder, applies the downlink, sets its model to θ_g, trains H inner steps (the
   inner optimizer and learning-rate schedule of `farsync train`, the schedule counted in
   the federation's steps: round r trains schedule steps r·H … r·H + H − 1), and replies
   with Δ = θ_g − θ encoded by the codec and the tokens it trained on;
3. the server decodes what came back before the deadline, decides what counts with the
   aggregation rules every farsync backend uses (:mod:`farsync.comm.exchange`: non-finite
   and outlier contributions left out, token-weighted), encodes the mean with the codec
   and decodes it (so the server applies exactly the bytes it sends), takes the outer step
   (Nesterov SGD; the last round lands the plain mean, as ``algo.final_average``) and
   keeps the encoded mean for clients that catch up later.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field

import torch

from farsync.algorithms.feedback import compensate
from farsync.algorithms.fragments import flatten, unflatten_into
from farsync.algorithms.outer import OuterStep, outer_sgd, sample_participants
from farsync.codecs import get_codec
from farsync.comm import exchange as ex
from farsync.comm.faults import corrupt, parse_fault
from farsync.files import atomic_write
from farsync.train import components


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def flat(model: torch.nn.Module) -> torch.Tensor:
    """Every trainable parameter, flattened into one fp32 vector (parameter order)."""
    return flatten(_trainable(model))


@torch.no_grad()
def load_flat(model: torch.nn.Module, vec: torch.Tensor) -> None:
    """The inverse of :func:`flat`."""
    unflatten_into(vec, _trainable(model))


class GlobalModel:
    """θ_g and its outer optimizer (an :class:`~farsync.algorithms.outer.OuterStep` over
    one flat vector), the same object on the server and in every client's copy: applying
    the same decoded means in the same order gives the same bits. ``version`` counts the
    rounds applied."""

    def __init__(self, theta: torch.Tensor, *, outer_lr: float, outer_momentum: float, outer_nesterov: bool = True):
        self.theta = theta.clone().float()
        self.version = 0
        self.outer = OuterStep([self.theta], outer_sgd(outer_lr, outer_momentum, outer_nesterov))

    def apply(self, mean: torch.Tensor | None, final: bool = False) -> None:
        """One round: the outer step with pseudo-gradient ``mean`` (None: a skipped round,
        θ_g unchanged); ``final``: θ_g ← θ_g − mean, no extrapolation."""
        if mean is not None:
            self.outer.land(mean, plain_mean=final)
        self.version += 1

    def state_dict(self) -> dict:
        return {"theta": self.theta.clone(), "version": self.version, "opt": self.outer.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.outer.load([state["theta"]], state["opt"])
        self.version = state["version"]


@dataclass
class Task:
    """What the server sends a client for one round."""

    round: int
    steps: int  # inner steps to train
    total_rounds: int
    deltas: list[tuple[int, bytes | None]] = field(default_factory=list)  # (round, encoded mean or None: skipped)
    full: dict | None = None  # GlobalModel.state_dict() when the client is too far behind (or new)

    def downlink_bytes(self) -> int:
        n = sum(len(b) for _, b in self.deltas if b is not None)
        if self.full is not None:
            n += self.full["theta"].numel() * 4
            n += sum(v.numel() * 4 for s in self.full["opt"]["state"].values() for v in s.values()
                     if isinstance(v, torch.Tensor))
        return n


@dataclass
class Reply:
    client: int
    round: int
    payload: bytes  # Δ encoded by the codec (an empty payload with tokens = nan: flagged invalid)
    tokens: int
    train_loss: float
    seconds: dict = field(default_factory=dict)  # where the client's time went

    @property
    def uplink_bytes(self) -> int:
        return len(self.payload)


def to_bytes(t: torch.Tensor) -> bytes:
    """A tensor's raw bytes (on the CPU, contiguous)."""
    return t.detach().contiguous().cpu().numpy().tobytes()


def from_bytes(b: bytes, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """A 1-D tensor of ``dtype`` over a copy of ``b``."""
    return torch.frombuffer(bytearray(b), dtype=dtype)


class FlatCodec:
    """A farsync codec over a fixed-length fp32 vector, to and from ``bytes``: pads to the
    codec's alignment."""

    def __init__(self, name: str, numel: int, block_size: int | None = None):
        self.codec = get_codec(name, block_size=block_size)
        self.numel = numel
        self.padded = numel + (-numel % self.codec.alignment)

    def encode(self, x: torch.Tensor) -> bytes:
        return to_bytes(self.codec.encode(torch.nn.functional.pad(x.float(), (0, self.padded - self.numel))))

    def decode(self, b: bytes) -> torch.Tensor:
        return self.codec.decode(from_bytes(b), self.padded)[: self.numel].clone()

    def nbytes(self) -> int:
        return self.codec.encoded_nbytes(self.padded)


class Server:
    """θ_g, the outer optimizer, the log of encoded means, and what each client holds."""

    def __init__(self, theta: torch.Tensor, *, rounds: int, steps: int, codec: str, outer_lr: float,
                 outer_momentum: float, aggregation: ex.Aggregation, per_round: int = 0, seed: int = 0,
                 keep_rounds: int = 8, final_average: bool = True, codec_block_size: int | None = None,
                 outer_nesterov: bool = True, error_feedback: bool = False, error_feedback_decay: float = 1.0):
        self.model = GlobalModel(theta, outer_lr=outer_lr, outer_momentum=outer_momentum, outer_nesterov=outer_nesterov)
        self.codec = FlatCodec(codec, theta.numel(), codec_block_size)
        self.rounds, self.steps, self.per_round, self.seed = rounds, steps, per_round, seed
        self.aggregation, self.keep_rounds, self.final_average = aggregation, keep_rounds, final_average
        self.log: dict[int, bytes | None] = {}  # round -> the encoded mean applied (None: skipped)
        self.held: dict[int, int] = {}  # client -> version of θ_g it holds (after our last message)
        self.history: list[dict] = []  # one row per round
        # error feedback on the downlink: what the codec drops from one round's mean goes into the next's
        self.error_feedback, self.error_feedback_decay = error_feedback and not self.codec.codec.lossless, error_feedback_decay
        self.residual: torch.Tensor | None = None

    @property
    def round(self) -> int:
        return self.model.version

    def sample(self, online: list[int]) -> list[int]:
        """The clients of this round: ``algo.participation`` of those ``online``, drawn as
        every farsync run draws them (:func:`~farsync.algorithms.outer.sample_participants`)."""
        return sample_participants(self.per_round, online, self.seed, 0, self.round)

    def work_for(self, client: int) -> Task:
        """The round's work for ``client``, with the downlink that brings it to θ_g."""
        have = self.held.get(client)
        r = self.round
        if have is not None and all(v in self.log for v in range(have, r)):
            w = Task(r, self.steps, self.rounds, deltas=[(v, self.log[v]) for v in range(have, r)])
        else:
            w = Task(r, self.steps, self.rounds, full=self.model.state_dict())
        self.held[client] = r  # once it has run this, it holds θ_g at version r
        return w

    def forget(self, client) -> None:
        """``client`` did not answer: what it holds is unknown (its next work is θ_g in full)."""
        self.held.pop(client, None)

    def finish_round(self, replies: dict[int, Reply], sampled: list[int]) -> dict:
        """Aggregate the replies that came (clients missing from ``replies`` are left out),
        take the outer step, log the encoded mean; the round's row."""
        r = self.round
        clients = sorted(replies)
        weights = [float(replies[c].tokens) for c in clients]
        decoded = {i: self.codec.decode(replies[c].payload) for i, c in enumerate(clients) if weights[i] > 0}
        stats = [ex.shard_stats(decoded, len(clients))] if self.aggregation.needs_stats else None
        d = ex.decide(self.aggregation, weights, stats) if clients else ex.Decision((), (), True)
        final = r == self.rounds - 1 and self.final_average
        if d.skipped:
            payload = None
            self.model.apply(None)
        else:
            mean = ex.combine(self.aggregation, decoded, weights, d.kept)
            if self.error_feedback:
                mean, self.residual = compensate(self.codec.codec, mean, self.residual, self.error_feedback_decay)
            payload = self.codec.encode(mean)
            self.model.apply(self.codec.decode(payload), final=final)
        self.log[r] = payload
        for old in [v for v in self.log if v < r + 1 - self.keep_rounds]:
            del self.log[old]
        row = {
            "round": r, "sampled": sampled, "replied": clients,
            "kept": [clients[i] for i in d.kept], "excluded": [[clients[i], why] for i, why in d.excluded],
            "missing": sorted(set(sampled) - set(clients)), "skipped": d.skipped,
            "tokens": int(sum(w for w in weights if w == w)),
            "bytes_up": {c: replies[c].uplink_bytes for c in clients},
        }
        self.history.append(row)
        return row

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "log": dict(self.log), "held": dict(self.held),
                "history": list(self.history), "residual": self.residual}

    def load_state_dict(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        self.log, self.held, self.history = dict(s["log"]), dict(s["held"]), list(s["history"])
        self.residual = s.get("residual")

    def save(self, path: str) -> None:
        atomic_write(path, lambda f: torch.save(self.state_dict(), f))


class Client:
    """One client's training between two messages; its state lives in ``state_dir`` (a
    ClientApp may be a new process for every message)."""

    def __init__(self, cfg, client: int, state_dir: str, corpus, device: torch.device | None = None):
        self.cfg, self.id, self.state_dir, self.corpus = cfg, client, state_dir, corpus
        self.device = device or torch.device("cpu")
        self.model = components.build_model(cfg, corpus.vocab_size, self.device)  # seeded: θ_0 is the same everywhere
        self.opt = components.inner_optimizer(cfg, self.model)
        a = cfg.algo
        self.global_model = GlobalModel(flat(self.model), outer_lr=a.outer_lr, outer_momentum=a.outer_momentum,
                                        outer_nesterov=a.outer_nesterov)
        self.codec = FlatCodec(a.codec, self.global_model.theta.numel(), a.codec_block_size)
        self.position = 0  # batches of its shard trained so far
        self.residual: torch.Tensor | None = None  # error feedback on the uplink
        self.path = os.path.join(state_dir, f"client-{client}.pt")
        if os.path.exists(self.path):
            from farsync.train.checkpoint import load_file  # tensors and plain data only; a bad file is named

            s = load_file(self.path, self.device, keys=("opt", "global", "position"))
            self.opt.load_state_dict(s["opt"])
            self.global_model.load_state_dict(s["global"])
            self.position = s["position"]
            self.residual = s.get("residual")

    def save(self) -> None:
        state = {"opt": self.opt.state_dict(), "global": self.global_model.state_dict(), "position": self.position,
                 "residual": self.residual}
        atomic_write(self.path, lambda f: torch.save(state, f))

    def catch_up(self, work: Task) -> None:
        """Apply the downlink: θ_g of the round ``work.round``."""
        if work.full is not None:
            self.global_model.load_state_dict(work.full)
        for v, payload in work.deltas:
            if v != self.global_model.version:
                raise ValueError(f"client {self.id}: holds θ_g of round {self.global_model.version}, "
                                 f"the server sent the mean of round {v}")
            final = v == work.total_rounds - 1 and self.cfg.algo.final_average
            self.global_model.apply(None if payload is None else self.codec.decode(payload), final=final)
        if self.global_model.version != work.round:
            raise ValueError(f"client {self.id}: at round {self.global_model.version} after the downlink, "
                             f"expected {work.round}")

    def train(self, work: Task, *, fault: str = "", speed: float = 1.0) -> Reply:
        """Catch up, train ``work.steps`` inner steps from θ_g, reply with Δ. ``fault``
        (``nan`` or ``scale:F``, :mod:`farsync.comm.faults`) corrupts the reply; ``speed`` <
        1 (a test/benchmark hook, as ``algo.worker_speeds`` under torchrun): after each
        step the client sleeps (1/speed − 1) × that step's time."""
        cfg = self.cfg
        t0 = time.perf_counter()
        self.catch_up(work)
        load_flat(self.model, self.global_model.theta)
        sched = components.lr_lambda(cfg)
        M, B, T = cfg.algo.workers, cfg.train.batch_size, cfg.model.seq_len
        losses = []
        t1 = time.perf_counter()
        self.model.train()
        for i in range(work.steps):
            ts = time.perf_counter()
            for g in self.opt.param_groups:
                g["lr"] = cfg.optim.lr * sched(work.round * work.steps + i)
            x, y = self.corpus.worker_batch(self.id, M, self.position, B, T, cfg.train.seed)
            losses.append(components.local_step(cfg, self.model, self.opt, x.to(self.device), y.to(self.device)))
            self.position += 1
            if speed < 1.0:
                time.sleep((time.perf_counter() - ts) * (1.0 / speed - 1.0))
        t2 = time.perf_counter()
        delta = self.global_model.theta - flat(self.model)
        a = cfg.algo
        if a.error_feedback and not self.codec.codec.lossless:
            delta, self.residual = compensate(self.codec.codec, delta, self.residual, a.error_feedback_decay)
        if fault:
            delta = corrupt(delta, *parse_client_fault(fault))
        payload = self.codec.encode(delta)
        tokens = work.steps * B * T
        self.save()
        t3 = time.perf_counter()
        return Reply(self.id, work.round, payload, tokens, sum(losses) / len(losses),
                     {"catch_up": t1 - t0, "train": t2 - t1, "encode_save": t3 - t2})


def parse_client_fault(spec: str) -> tuple[str, float]:
    """A client's fault: ``nan`` or ``scale:F`` (:func:`farsync.comm.faults.parse_fault`;
    ``leave`` is for all-to-all runs: a federated client that leaves is one that does not
    reply)."""
    kind, factor = parse_fault(spec)
    if kind == "leave":
        raise ValueError(f"a federated client's fault must be nan or scale:FACTOR (got {spec!r})")
    return kind, factor


def make_server(cfg, theta: torch.Tensor, rounds: int) -> Server:
    """The server of a federation of ``rounds`` rounds per ``cfg``, starting from ``theta``."""
    a = cfg.algo
    return Server(theta, rounds=rounds, steps=a.inner_steps, codec=a.codec, outer_lr=a.outer_lr,
                  outer_momentum=a.outer_momentum, outer_nesterov=a.outer_nesterov,
                  aggregation=a.make_aggregation(), per_round=a.participation, seed=cfg.train.seed,
                  keep_rounds=cfg.federated.keep_rounds, final_average=a.final_average,
                  codec_block_size=a.codec_block_size, error_feedback=a.error_feedback,
                  error_feedback_decay=a.error_feedback_decay)


def simulate_federation(cfg, run_dir: str, *, rounds: int, online=None, fault: str = "", faulty_client: int = -1,
                        log=print) -> Server:
    """The federation in one process: the same Server and Client code, each client's
    state through its state file, a new Client object every round as a new ClientApp
    process would be. ``online(round)``: the clients online in that round (default all)."""
    from farsync.data import Corpus

    a = cfg.algo
    corpus = Corpus.build(cfg.data, log=lambda m: None)
    server = make_server(cfg, flat(components.build_model(cfg, corpus.vocab_size, torch.device("cpu"))), rounds)
    state_dir = os.path.join(run_dir, "clients")
    shutil.rmtree(state_dir, ignore_errors=True)  # a new federation: no client state from an earlier one
    for r in range(rounds):
        chosen = server.sample(sorted(online(r)) if online else list(range(a.workers)))
        replies = {}
        for c in chosen:
            work = server.work_for(c)
            replies[c] = Client(cfg, c, state_dir, corpus).train(work, fault=fault if c == faulty_client else "")
        row = server.finish_round(replies, chosen)
        log(f"round {r}: clients {row['kept']} kept" + (f", excluded {row['excluded']}" if row["excluded"] else ""))
    return server
