"""Federated DiLoCo (Photon): one server holds θ_g and the outer optimizer; clients train.

No transport here: :class:`Server` and :class:`Client` exchange plain Python objects
(:class:`Task`, :class:`Reply`), so the same code runs in one process
(:func:`simulate_federation`) and under Flower (:mod:`farsync.federated.flower`), and the
two give the same θ_g bit for bit (tested). The outer step, the fragments, the sync
schedule and the participation sample are those of every farsync run
(:mod:`farsync.algorithms.outer`, :mod:`farsync.algorithms.fragments`,
:mod:`farsync.schedule`), so a federation equals the all-to-all DiLoCo or Streaming DiLoCo
run of the same schedule (tested, with an fp32 codec: the server re-encodes the mean it
sends back, which all-to-all all-gather does not).

Fragments (Streaming DiLoCo without overlap, ``algo.mode = streaming``, P =
``algo.fragments``, τ = 0): the rounds are the schedule's syncs (:func:`round_plan`): the
first after H inner steps syncs fragment 0, then one every H/P steps syncs the next
fragment, and the last round syncs every fragment trained since its last sync. A round's
upload and download carry one fragment: about 1/P of the model. The server keeps θ_g and
an outer optimizer per fragment; a client keeps its own parameters θ_m between rounds,
since a fragment not synced in a round trains on from where it was. P = 1 is DiLoCo: one
fragment, a round every H steps.

A round r:

1. the server samples K of the clients online (seeded by (seed, r)) and sends each a
   :class:`Task`: the round, the schedule steps to train, the fragments to sync after
   them, and the *downlink* that brings the client's copy of θ_g up to date: the encoded
   mean pseudo-gradients of the rounds it missed (each a codec payload of one fragment,
   replayed through the same outer step the server took), or, for a client further behind
   than the server keeps (or new), θ_g and the outer optimizers' state in fp32;
2. a client loads its state (inner optimizer, data position, θ_g and outer state, θ_m)
   from its state folder, applies the downlink — each fragment landed sets the client's
   θ_m of it to θ_g (θ_g in full sets all of θ_m) — trains its steps from θ_m (the inner
   optimizer and learning-rate schedule of `farsync train`, counted in the federation's
   steps), and replies with Δ_p = θ_g,p − θ_m,p of each fragment p of the round, encoded
   by the codec, and the tokens it trained on since p last synced there;
3. the server decodes what came back before the deadline, decides what counts with the
   aggregation rules every farsync backend uses (:mod:`farsync.comm.exchange`: non-finite
   and outlier contributions left out, token-weighted), encodes the mean with the codec
   and decodes it (so the server applies exactly the bytes it sends), takes the fragment's
   outer step (Nesterov SGD; the last round lands the plain mean, as
   ``algo.final_average``) and keeps the encoded mean for clients that catch up later.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from farsync.algorithms.feedback import compensate
from farsync.algorithms.fragments import build_fragments, flatten, unflatten_into
from farsync.algorithms.outer import OuterStep, outer_sgd, sample_participants
from farsync.codecs import get_codec
from farsync.comm import exchange as ex
from farsync.comm.faults import corrupt, parse_fault
from farsync.files import atomic_write
from farsync.schedule import default_mixing, due_fragments
from farsync.train import components
from farsync.train.config import ConfigError

#: A fragment's place in the flat parameter vector: (offset, length) runs, in its order.
Spans = list[tuple[int, int]]


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def flat(model: torch.nn.Module) -> torch.Tensor:
    """Every trainable parameter, flattened into one fp32 vector (parameter order)."""
    return flatten(_trainable(model))


@torch.no_grad()
def load_flat(model: torch.nn.Module, vec: torch.Tensor) -> None:
    """The inverse of :func:`flat`."""
    unflatten_into(vec, _trainable(model))


def gather(vec: torch.Tensor, spans: Spans) -> torch.Tensor:
    """A fragment's values out of the flat vector ``vec`` (a copy), in the fragment's order."""
    return torch.cat([vec[o: o + n] for o, n in spans])


@torch.no_grad()
def scatter(vec: torch.Tensor, spans: Spans, part: torch.Tensor) -> None:
    """The inverse of :func:`gather`: write ``part`` into ``vec`` in place."""
    at = 0
    for o, n in spans:
        vec[o: o + n] = part[at: at + n]
        at += n


def federated_fragments(cfg) -> int:
    """P of a federation: ``algo.fragments`` in streaming mode, else 1 (DiLoCo)."""
    return cfg.algo.fragments if cfg.algo.mode == "streaming" else 1


def check_federated(cfg):
    """Refuse what federated rounds cannot run, one line naming the option; ``cfg``."""
    a = cfg.algo
    if a.mode != "dp" and a.sync_delay != 0:
        raise ConfigError(f"algo.sync_delay (τ) = {a.sync_delay}: federated rounds have no overlap (a client waits "
                          "for the mean before it trains on); set --algo.sync_delay=0")
    mixing = a.mixing if a.mixing is not None else default_mixing(a.sync_delay)
    if a.mode != "dp" and mixing != 0:
        raise ConfigError(f"algo.mixing (α) = {mixing:g}: federated rounds replace a fragment's local values with "
                          "θ_g when it syncs (α = 0); set --algo.mixing=0")
    return cfg


def federated_config(recipe: dict | None, overrides: list[str]):
    """The config of a federated run, built as `farsync train` builds it except that τ
    (``algo.sync_delay``, 1 by default there) is 0 unless the recipe or an override sets
    it; refused in one line (:func:`check_federated`) when federated rounds cannot run it."""
    from farsync.train.config import build_config

    given = "sync_delay" in ((recipe or {}).get("algo") or {}) or any(
        o.lstrip("-").partition("=")[0] == "algo.sync_delay" for o in overrides)
    return check_federated(build_config(recipe, overrides if given else ["--algo.sync_delay=0", *overrides]))


def fragment_spans(cfg, model: torch.nn.Module) -> list[Spans]:
    """Where each of the federation's fragments lies in :func:`flat` of ``model``: the
    fragments :func:`~farsync.algorithms.fragments.build_fragments` cuts for
    ``algo.fragments`` and ``algo.fragment_pattern`` (those of an all-to-all run), their
    parameters in the same order, so :func:`gather` of a fragment is what DiLoCo flattens."""
    at, o = {}, 0
    for p in _trainable(model):
        at[id(p)] = (o, p.numel())
        o += p.numel()
    out = []
    for frag in build_fragments(model, federated_fragments(cfg), cfg.algo.fragment_pattern):
        spans: Spans = []
        for p in frag.params:
            s, n = at[id(p)]
            if spans and sum(spans[-1]) == s:
                spans[-1] = (spans[-1][0], spans[-1][1] + n)  # contiguous with the last run: extend it
            else:
                spans.append((s, n))
        out.append(spans)
    return out


class PlannedRound(NamedTuple):
    start: int  # schedule steps trained before this round
    steps: int  # inner steps it trains
    fragments: tuple[int, ...]  # synced after them


def round_plan(inner_steps: int, fragments: int, total_steps: int) -> list[PlannedRound]:
    """The federation's rounds over ``total_steps`` inner steps: one per sync of
    :func:`farsync.schedule.due_fragments` (fragment p after steps k·H + t_p), and at the
    end, as DiLoCo's ``launch_final``, every fragment trained since its last sync. P = 1:
    a round of H steps each."""
    plan, start, last = [], 0, [0] * fragments
    for step in range(1, total_steps + 1):
        due = due_fragments(step, inner_steps, fragments)
        if step == total_steps:
            due = [f for f in range(fragments) if f in due or last[f] < step]
        if due:
            plan.append(PlannedRound(start, step - start, tuple(due)))
            start = step
            for f in due:
                last[f] = step
    return plan


class GlobalModel:
    """θ_g and its outer optimizers, one :class:`~farsync.algorithms.outer.OuterStep` per
    fragment over that fragment's flat vector (``spans``: where each lies in the flat
    parameter vector; None: one fragment, all of it), the same object on the server and in
    every client's copy: applying the same decoded means in the same order gives the same
    bits. ``version`` counts the rounds applied."""

    def __init__(self, theta: torch.Tensor, *, outer_lr: float, outer_momentum: float, outer_nesterov: bool = True,
                 spans: list[Spans] | None = None):
        theta = theta.detach().float()
        self.numel = theta.numel()
        self.spans = spans if spans is not None else [[(0, self.numel)]]
        factory = outer_sgd(outer_lr, outer_momentum, outer_nesterov)
        self.outer = [OuterStep([gather(theta, s)], factory) for s in self.spans]
        self.version = 0

    @property
    def fragments(self) -> int:
        return len(self.outer)

    def part(self, f: int) -> torch.Tensor:
        """θ_g of fragment ``f`` (its flat vector, the outer optimizer's: do not modify)."""
        return self.outer[f].anchors[0]

    @property
    def theta(self) -> torch.Tensor:
        """θ_g as one flat vector in parameter order (with one fragment: the outer
        optimizer's own tensor, do not modify)."""
        if self.spans == [[(0, self.numel)]]:
            return self.part(0)
        out = torch.empty(self.numel)
        for f, s in enumerate(self.spans):
            scatter(out, s, self.part(f))
        return out

    def apply(self, means: dict[int, torch.Tensor | None], final: bool = False) -> None:
        """One round: for each fragment synced in it, the outer step with its mean
        pseudo-gradient (None: skipped, θ_g,p unchanged); ``final``: θ_g,p ← θ_g,p −
        mean, no extrapolation."""
        for f, mean in means.items():
            if mean is not None:
                self.outer[f].land(mean, plain_mean=final)
        self.version += 1

    def state_dict(self) -> dict:
        return {"theta": self.theta.clone(), "version": self.version,
                "opt": [o.optimizer.state_dict() for o in self.outer]}

    def load_state_dict(self, state: dict) -> None:
        opts = state["opt"] if isinstance(state["opt"], list) else [state["opt"]]  # one fragment's, unlisted
        if len(opts) != len(self.outer):
            raise ValueError(f"a state of θ_g in {len(opts)} fragment(s); this federation has {len(self.outer)} "
                             "(algo.fragments)")
        for o, s, opt in zip(self.outer, self.spans, opts):
            o.load([gather(state["theta"].float(), s)], opt)
        self.version = state["version"]


def _state_nbytes(opt_state: dict) -> int:
    return sum(v.numel() * 4 for s in opt_state["state"].values() for v in s.values() if isinstance(v, torch.Tensor))


@dataclass
class Task:
    """What the server sends a client for one round."""

    round: int
    start: int  # schedule steps before this round: it trains schedule steps start … start + steps − 1
    steps: int  # inner steps to train
    fragments: tuple[int, ...]  # the fragments whose Δ the reply carries, in this order
    total_rounds: int
    # (round, fragment, its encoded mean or None: skipped), rounds in order
    deltas: list[tuple[int, int, bytes | None]] = field(default_factory=list)
    full: dict | None = None  # GlobalModel.state_dict() when the client is too far behind (or new)

    def downlink_bytes(self) -> int:
        n = sum(len(b) for _, _, b in self.deltas if b is not None)
        if self.full is not None:
            n += self.full["theta"].numel() * 4 + sum(_state_nbytes(o) for o in self.full["opt"])
        return n


@dataclass
class Reply:
    client: int
    round: int
    payloads: list[bytes]  # per fragment of the round (Task.fragments): its Δ encoded by the codec
    tokens: list[int]  # per fragment: tokens trained on since it last synced on this client (its weight)
    trained: int  # tokens trained on in this round
    train_loss: float
    seconds: dict = field(default_factory=dict)  # where the client's time went

    @property
    def uplink_bytes(self) -> int:
        return sum(len(b) for b in self.payloads)


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
    """θ_g, the outer optimizers, the log of encoded means, and what each client holds.

    ``rounds`` rounds of ``steps`` = H inner steps (``rounds`` × H in all); with P
    fragments (``spans``, one per fragment, from :func:`fragment_spans`; None: one) the
    federation's rounds are the syncs of that schedule (:attr:`plan`, :func:`round_plan`),
    so :attr:`rounds` is their number: (``rounds`` − 1)·P + 1."""

    def __init__(self, theta: torch.Tensor, *, rounds: int, steps: int, codec: str, outer_lr: float,
                 outer_momentum: float, aggregation: ex.Aggregation, per_round: int = 0, seed: int = 0,
                 keep_rounds: int = 8, final_average: bool = True, codec_block_size: int | None = None,
                 outer_nesterov: bool = True, error_feedback: bool = False, error_feedback_decay: float = 1.0,
                 spans: list[Spans] | None = None):
        self.model = GlobalModel(theta, outer_lr=outer_lr, outer_momentum=outer_momentum, outer_nesterov=outer_nesterov,
                                 spans=spans)
        self.codecs = [FlatCodec(codec, o.numel, codec_block_size) for o in self.model.outer]  # one per fragment
        self.plan = round_plan(steps, self.model.fragments, rounds * steps)
        self.rounds, self.steps, self.per_round, self.seed = len(self.plan), steps, per_round, seed
        self.aggregation, self.keep_rounds, self.final_average = aggregation, keep_rounds, final_average
        # round -> per fragment synced: (fragment, the encoded mean applied or None: skipped)
        self.log: dict[int, list[tuple[int, bytes | None]]] = {}
        self.held: dict[int, int] = {}  # client -> version of θ_g it holds (after our last message)
        self.history: list[dict] = []  # one row per round
        # error feedback on the downlink, per fragment: what the codec drops from one round's mean goes into the next's
        self.error_feedback = error_feedback and not self.codecs[0].codec.lossless
        self.error_feedback_decay = error_feedback_decay
        self.residuals: list[torch.Tensor | None] = [None] * self.model.fragments

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
        end = self.plan[-1].start + self.plan[-1].steps
        p = self.plan[r] if r < self.rounds else PlannedRound(end, 0, ())  # after the last round: the downlink only
        common = dict(round=r, start=p.start, steps=p.steps, fragments=p.fragments, total_rounds=self.rounds)
        if have is not None and all(v in self.log for v in range(have, r)):
            w = Task(**common, deltas=[(v, f, b) for v in range(have, r) for f, b in self.log[v]])
        else:
            w = Task(**common, full=self.model.state_dict())
        self.held[client] = r  # once it has run this, it holds θ_g at version r
        return w

    def forget(self, client) -> None:
        """``client`` did not answer: what it holds is unknown (its next work is θ_g in full)."""
        self.held.pop(client, None)

    def check_reply(self, reply: Reply) -> str | None:
        """Why ``reply`` cannot count in this round (None: it can): a payload per fragment
        of the round, each of the codec's size, a token count per fragment."""
        frags = self.plan[self.round].fragments
        if len(reply.payloads) != len(frags) or len(reply.tokens) != len(frags):
            return f"replied with {len(reply.payloads)} payload(s) for the round's {len(frags)} fragment(s)"
        for f, b in zip(frags, reply.payloads):
            if len(b) != self.codecs[f].nbytes():
                return f"a payload of {len(b)} bytes for fragment {f} (its codec's is {self.codecs[f].nbytes()})"
        return None

    def finish_round(self, replies: dict[int, Reply], sampled: list[int]) -> dict:
        """Aggregate the replies that came (clients missing from ``replies`` are left out),
        take each fragment's outer step, log the encoded means; the round's row."""
        r = self.round
        clients = sorted(replies)
        final = r == self.rounds - 1 and self.final_average
        means, logged, kept, excluded, skipped = {}, [], set(clients), {}, []
        for j, f in enumerate(self.plan[r].fragments):
            codec = self.codecs[f]
            weights = [float(replies[c].tokens[j]) for c in clients]
            decoded = {i: codec.decode(replies[c].payloads[j]) for i, c in enumerate(clients) if weights[i] > 0}
            stats = [ex.shard_stats(decoded, len(clients))] if self.aggregation.needs_stats else None
            d = ex.decide(self.aggregation, weights, stats) if clients else ex.Decision((), (), True)
            if d.skipped:
                payload = means[f] = None
            else:
                mean = ex.combine(self.aggregation, decoded, weights, d.kept)
                if self.error_feedback:
                    mean, self.residuals[f] = compensate(codec.codec, mean, self.residuals[f],
                                                         self.error_feedback_decay)
                payload = codec.encode(mean)
                means[f] = codec.decode(payload)
            logged.append((f, payload))
            kept &= {clients[i] for i in d.kept}
            for i, why in d.excluded:
                excluded.setdefault(clients[i], why if len(self.plan[r].fragments) == 1 else f"fragment {f}: {why}")
            skipped.append(d.skipped)
        self.model.apply(means, final=final)
        self.log[r] = logged
        for old in [v for v in self.log if v < r + 1 - self.keep_rounds]:
            del self.log[old]
        row = {
            "round": r, "fragments": list(self.plan[r].fragments), "sampled": sampled, "replied": clients,
            "kept": sorted(kept), "excluded": [[c, why] for c, why in sorted(excluded.items())],
            "missing": sorted(set(sampled) - set(clients)), "skipped": all(skipped),
            "tokens": int(sum(replies[c].trained for c in clients)),
            "bytes_up": {c: replies[c].uplink_bytes for c in clients},
        }
        self.history.append(row)
        return row

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "log": dict(self.log), "held": dict(self.held),
                "history": list(self.history), "residuals": list(self.residuals)}

    def load_state_dict(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        # a checkpoint of one fragment from before fragments: a round's mean and the residual, unlisted
        self.log = {v: m if isinstance(m, list) else [(0, m)] for v, m in s["log"].items()}
        self.held, self.history = dict(s["held"]), list(s["history"])
        self.residuals = list(s["residuals"]) if "residuals" in s else [s.get("residual")]

    def save(self, path: str) -> None:
        atomic_write(path, lambda f: torch.save(self.state_dict(), f))


class Client:
    """One client's training between two messages; its state is saved in ``state_dir``
    after every round and read back when the object is built (a site's trainer keeps one
    across rounds, :mod:`farsync.federated.trainer`; one started again reads it)."""

    def __init__(self, cfg, client: int, state_dir: str, corpus, device: torch.device | None = None):
        self.cfg, self.id, self.state_dir, self.corpus = cfg, client, state_dir, corpus
        self.device = device or torch.device("cpu")
        self.model = components.build_model(cfg, corpus.vocab_size, self.device)  # seeded: θ_0 is the same everywhere
        self.opt = components.inner_optimizer(cfg, self.model)
        a = cfg.algo
        self.global_model = GlobalModel(flat(self.model), outer_lr=a.outer_lr, outer_momentum=a.outer_momentum,
                                        outer_nesterov=a.outer_nesterov, spans=fragment_spans(cfg, self.model))
        P = self.global_model.fragments
        self.codecs = [FlatCodec(a.codec, o.numel, a.codec_block_size) for o in self.global_model.outer]
        self.position = 0  # batches of its shard trained so far
        self.residuals: list[torch.Tensor | None] = [None] * P  # error feedback on the uplink, per fragment
        self.tokens = [0] * P  # per fragment: tokens trained on since it last synced here
        # θ_m between rounds (P > 1: a fragment not synced trains on from here); None: θ_m = θ_g
        self.local: torch.Tensor | None = None
        self.path = os.path.join(state_dir, f"client-{client}.pt")
        if os.path.exists(self.path):
            from farsync.train.checkpoint import load_file  # tensors and plain data only; a bad file is named

            s = load_file(self.path, self.device, keys=("opt", "global", "position"))
            self.opt.load_state_dict(s["opt"])
            self.global_model.load_state_dict(s["global"])
            self.position = s["position"]
            self.residuals = list(s["residuals"]) if "residuals" in s else [s.get("residual")]  # one fragment, unlisted
            self.tokens = list(s.get("tokens", self.tokens))
            self.local = s.get("local")

    def save(self) -> None:
        state = {"opt": self.opt.state_dict(), "global": self.global_model.state_dict(), "position": self.position,
                 "residuals": self.residuals, "tokens": self.tokens, "local": self.local}
        atomic_write(self.path, lambda f: torch.save(state, f))

    def _landed(self, f: int) -> None:
        """Fragment ``f`` synced: θ_m of it ← θ_g (α = 0), its token count starts again."""
        if self.local is not None:
            scatter(self.local, self.global_model.spans[f], self.global_model.part(f))
        self.tokens[f] = 0

    def catch_up(self, work: Task) -> None:
        """Apply the downlink: θ_g of the round ``work.round``, and θ_m of every fragment
        synced since this client's last round set to it."""
        g = self.global_model
        if work.full is not None:
            g.load_state_dict(work.full)
            self.local, self.tokens = None, [0] * g.fragments  # θ_m ← θ_g, all of it
        for v, entries in itertools.groupby(work.deltas, key=lambda d: d[0]):
            if v != g.version:
                raise ValueError(f"client {self.id}: holds θ_g of round {g.version}, "
                                 f"the server sent the mean of round {v}")
            means = {f: None if b is None else self.codecs[f].decode(b) for _, f, b in entries}
            g.apply(means, final=v == work.total_rounds - 1 and self.cfg.algo.final_average)
            for f in means:
                self._landed(f)
        if g.version != work.round:
            raise ValueError(f"client {self.id}: at round {g.version} after the downlink, expected {work.round}")

    def train(self, work: Task, *, fault: str = "", speed: float = 1.0) -> Reply:
        """Catch up, train ``work.steps`` inner steps from θ_m, reply with Δ of each
        fragment of the round. ``fault`` (``nan`` or ``scale:F``,
        :mod:`farsync.comm.faults`) corrupts the reply; ``speed`` < 1 (a test/benchmark
        hook, as ``algo.worker_speeds`` under torchrun): after each step the client sleeps
        (1/speed − 1) × that step's time."""
        cfg = self.cfg
        t0 = time.perf_counter()
        self.catch_up(work)
        g = self.global_model
        load_flat(self.model, g.theta if self.local is None else self.local)
        sched = components.lr_lambda(cfg)
        M, B, T = cfg.algo.workers, cfg.train.batch_size, cfg.model.seq_len
        losses = []
        t1 = time.perf_counter()
        self.model.train()
        for i in range(work.steps):
            ts = time.perf_counter()
            for group in self.opt.param_groups:
                group["lr"] = cfg.optim.lr * sched(work.start + i)
            x, y = self.corpus.worker_batch(self.id, M, self.position, B, T, cfg.train.seed)
            losses.append(components.local_step(cfg, self.model, self.opt, x.to(self.device), y.to(self.device)))
            self.position += 1
            if speed < 1.0:
                time.sleep((time.perf_counter() - ts) * (1.0 / speed - 1.0))
        t2 = time.perf_counter()
        trained = work.steps * B * T
        self.tokens = [t + trained for t in self.tokens]
        theta_m = flat(self.model)
        a = cfg.algo
        payloads, tokens = [], []
        for f in work.fragments:
            codec = self.codecs[f]
            delta = g.part(f) - gather(theta_m, g.spans[f])  # Δ_p = θ_g,p − θ_m,p
            if a.error_feedback and not codec.codec.lossless:
                delta, self.residuals[f] = compensate(codec.codec, delta, self.residuals[f], a.error_feedback_decay)
            if fault:
                delta = corrupt(delta, *parse_client_fault(fault))
            payloads.append(codec.encode(delta))
            tokens.append(self.tokens[f])
            self.tokens[f] = 0
        self.local = theta_m if g.fragments > 1 else None  # one fragment: it all lands next round
        self.save()
        t3 = time.perf_counter()
        return Reply(self.id, work.round, payloads, tokens, trained, sum(losses) / len(losses),
                     {"catch_up": t1 - t0, "train": t2 - t1, "encode_save": t3 - t2})


def parse_client_fault(spec: str) -> tuple[str, float]:
    """A client's fault: ``nan`` or ``scale:F`` (:func:`farsync.comm.faults.parse_fault`;
    ``leave`` is for all-to-all runs: a federated client that leaves is one that does not
    reply)."""
    kind, factor = parse_fault(spec)
    if kind == "leave":
        raise ValueError(f"a federated client's fault must be nan or scale:FACTOR (got {spec!r})")
    return kind, factor


def make_server(cfg, model: torch.nn.Module, rounds: int) -> Server:
    """The server of a federation of ``rounds`` rounds of H steps per ``cfg``, starting
    from ``model``'s parameters, in its fragments."""
    a = check_federated(cfg).algo
    return Server(flat(model), rounds=rounds, steps=a.inner_steps, codec=a.codec, outer_lr=a.outer_lr,
                  outer_momentum=a.outer_momentum, outer_nesterov=a.outer_nesterov,
                  aggregation=a.make_aggregation(), per_round=a.participation, seed=cfg.train.seed,
                  keep_rounds=cfg.federated.keep_rounds, final_average=a.final_average,
                  codec_block_size=a.codec_block_size, error_feedback=a.error_feedback,
                  error_feedback_decay=a.error_feedback_decay, spans=fragment_spans(cfg, model))


def simulate_federation(cfg, run_dir: str, *, rounds: int, online=None, fault: str = "", faulty_client: int = -1,
                        log=print) -> Server:
    """The federation of ``rounds`` rounds of H steps in one process (with P fragments,
    ``server.rounds`` rounds: the schedule's syncs): the same Server and Client code, each
    client's state through its state file, a new Client object every round as a new
    ClientApp process would be. ``online(round)``: the clients online in that round
    (default all)."""
    from farsync.data import Corpus

    a = cfg.algo
    corpus = Corpus.build(cfg.data, log=lambda m: None)
    server = make_server(cfg, components.build_model(cfg, corpus.vocab_size, torch.device("cpu")), rounds)
    state_dir = os.path.join(run_dir, "clients")
    shutil.rmtree(state_dir, ignore_errors=True)  # a new federation: no client state from an earlier one
    for r in range(server.rounds):
        chosen = server.sample(sorted(online(r)) if online else list(range(a.workers)))
        replies = {}
        for c in chosen:
            work = server.work_for(c)
            replies[c] = Client(cfg, c, state_dir, corpus).train(work, fault=fault if c == faulty_client else "")
        row = server.finish_round(replies, chosen)
        log(f"round {r}: clients {row['kept']} kept" + (f", excluded {row['excluded']}" if row["excluded"] else ""))
    return server
