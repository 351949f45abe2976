"""DiLoCo and Streaming DiLoCo around an unchanged inner optimizer.

Papers: DiLoCo, Douillard et al. 2023 (arXiv 2311.08105); Streaming DiLoCo, Douillard et
al. 2025 (arXiv 2501.18512).

Symbols → arguments (the schedule itself is :mod:`farsync.schedule`):

=========  ==========================  =================================================
symbol     argument                    meaning
=========  ==========================  =================================================
M          ``workers``                 workers (replicas); checked against ``comm``
H          ``inner_steps``             inner steps between two syncs of a fragment
P          ``fragments``               fragments synced at staggered offsets t_p = p·H/P
τ          ``sync_delay``              inner steps run while a fragment is in flight
α          ``mixing``                  θ_m ← α·θ_m + (1−α)·θ̃ when a sync lands
η_outer    ``outer_lr``                outer SGD learning rate (0.7 in the papers)
μ_outer    ``outer_momentum``          outer Nesterov momentum (0.9)
=========  ==========================  =================================================

The phases (:mod:`farsync.algorithms.strategy`): :meth:`DiLoCo.inner_step` takes the inner
optimizer's step, then every fragment due at this step computes its pseudo-gradient
Δ_p = θ_g,p − θ_m,p and starts its exchange; :meth:`DiLoCo.complete` lands every fragment
sent τ steps ago: wait for the mean Δ_p, take the outer step θ̃_p = OuterOpt_p(θ_g,p, Δ_p),
set θ_g,p ← θ̃_p and merge the local copy θ_m,p ← α·θ_m,p + (1−α)·θ̃_p.

Inner optimizer state never leaves the worker.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from farsync.algorithms.feedback import compensate
from farsync.algorithms.fragments import Fragment, build_fragments, flatten, full, local
from farsync.algorithms.outer import OuterOptimizerFactory, OuterStep, outer_sgd, sample_participants
from farsync.algorithms.strategy import Strategy
from farsync.codecs import get_codec
from farsync.comm.base import CompletedWork, Communicator, ExchangeResult, Work
from farsync.comm.exchange import Aggregation
from farsync.schedule import SettingError, check_schedule, default_mixing, due_fragments, fragment_offsets


class DiLoCo(Strategy):
    """One worker's side of DiLoCo / Streaming DiLoCo.

    Example (one process per worker under torchrun)::

        comm = TorchDistributedCommunicator()
        algo = DiLoCo(model, torch.optim.AdamW(model.parameters(), lr=4e-4), comm,
                      mode="streaming", inner_steps=100, fragments=4, sync_delay=1,
                      codec="fp4-e3m0")
        for x, y in batches:
            model(x, y)[1].backward()
            algo.step()                  # inner step, and fragment syncs when due
            algo.inner_optimizer.zero_grad()
        algo.finish()                    # land fragments still in flight

    Args:
        model: any ``nn.Module``; fragments are found automatically when its blocks are
            in an ``nn.ModuleList`` (see :mod:`farsync.algorithms.fragments`).
        inner_optimizer: any ``torch.optim.Optimizer`` over the model's parameters; it is
            used unchanged and its state is never communicated.
        comm: this worker's :class:`~farsync.comm.Communicator`.
        mode: ``"diloco"`` (P = 1, τ = 0, α = 0) or ``"streaming"``; for data-parallel
            use :class:`~farsync.algorithms.dp.DataParallel` (or
            :func:`~farsync.algorithms.make_strategy`, where one flag picks the method).
        inner_steps: H, inner steps per round.
        fragments: P (streaming only).
        fragment_pattern: ``"strided"`` (paper default) or ``"sequential"``.
        fragment_groups: explicit fragments (name patterns or modules), overriding P and
            the pattern.
        sync_delay: τ, inner steps overlapped with a fragment's exchange; τ < H/P.
        mixing: α in [0, 1]; None (default) = 0 when τ = 0 (replace, as DiLoCo) and
            0.25 when τ ≥ 1 (measured best by farsync's quality benchmark; the paper's
            uniform mix is 0.5, see :data:`farsync.schedule.OVERLAP_MIXING`).
        codec: pseudo-gradient codec (``fp32``, ``bf16``, ``int8``, ``fp4-e3m0``,
            ``fp4-e2m1``, or a sparse ``topk{D}-{V}``: the top 1/D of each chunk, sent by
            all-gather; see :mod:`farsync.codecs`). With a sparse codec use
            ``error_feedback`` — SparseLoCo (arXiv 2508.15706) is ``codec="topk64-int2",
            error_feedback=True, error_feedback_decay≈0.95`` with ``outer_momentum=0``
            (the accumulator stands in for the outer momentum) and an outer lr near 1.
        codec_block_size: values per codec scale block (codec default when None).
        stochastic_rounding: stochastic instead of round-to-nearest quantization.
        error_feedback: keep what the codec dropped from this worker's pseudo-gradient
            and add it to the next one of the same fragment (error feedback, as in
            EF21 and MuLoCo's study of compressed pseudo-gradients). The residual is exact
            for the payload this worker sends; the re-encoding of a reduced shard
            (reduce-scatter, M ≥ 3) is not compensated. Needs round-to-nearest; a no-op
            with fp32.
        error_feedback_decay: β of the accumulator: e ← β·e + Δ, send Q(e), e ← e − Q(e)
            (1: today's plain residual).
        exchange: ``"auto"``, ``"reduce-scatter"`` or ``"all-gather"``
            (see :mod:`farsync.comm.exchange`).
        outer_optimizer: factory ``params -> Optimizer`` for each fragment's outer
            optimizer; default SGD(lr=outer_lr, momentum=outer_momentum, Nesterov unless
            ``outer_nesterov`` is off; :func:`~farsync.algorithms.outer.outer_sgd`).
        final_average: how training ends. :meth:`finish` always sends every fragment
            trained since its last send (so θ_g holds every inner step, also the last
            ones of a Streaming fragment whose round had not come); with
            ``final_average`` those final exchanges, and the regular ones sent after
            inner step ``total_steps``, land as the plain mean of the workers
            (θ_g ← θ_g − Δ̄: outer lr 1, no momentum) instead of an outer step, so the
            model kept is not a momentum extrapolation. ``total_steps`` unknown (None):
            only the exchanges :meth:`finish` sends.
        total_steps: inner steps the run will take (see ``final_average``).
        workers: expected M; a communicator of another size is an error.
        seed: seeds this worker's stochastic-rounding generator (with its rank).
        aggregation: how the receivers check and combine pseudo-gradients
            (:class:`~farsync.comm.exchange.Aggregation`; default: weighted mean, a
            non-finite pseudo-gradient or one whose norm per unit of weight is over 10 ×
            the lower median of the others' is left out of its round and recorded in
            ``exclusions``).
        token_weighting: weight each worker's pseudo-gradient by the tokens it trained
            on since that fragment's last sync (Photon, FedAvg); equal counts give the
            plain mean, bit for bit. Off: every sender weighs 1.
        participation: K, the workers sampled to contribute to each fragment's round
            (None: all M). The sample is drawn from ``participation_seed``, the
            fragment and the round, so every worker and backend draws the same; the
            others sit the round out (no payload) and, like everyone, continue from θ_g.
            Final syncs (end of training) take every worker.
        participation_seed: seeds the participation sample.
        offload: keep θ_g (the anchors) and the outer optimizers' state in CPU memory
            (pinned where CUDA is available), so that the device holds only what plain
            training holds (Streaming DiLoCo's offloading). A fragment's pseudo-gradient
            is then formed, encoded and exchanged on the CPU from a copy of its
            parameters taken off the device one tensor at a time, and θ_g is copied back
            when a sync lands. No effect on a model that lives on the CPU.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        comm: Communicator,
        *,
        mode: str = "streaming",
        inner_steps: int = 100,
        fragments: int = 1,
        fragment_pattern: str = "strided",
        fragment_groups: list[list] | None = None,
        sync_delay: int = 0,
        mixing: float | None = None,
        codec: str = "fp32",
        codec_block_size: int | None = None,
        stochastic_rounding: bool = False,
        error_feedback: bool = False,
        error_feedback_decay: float = 1.0,
        exchange: str = "auto",
        outer_optimizer: OuterOptimizerFactory | None = None,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        outer_nesterov: bool = True,
        final_average: bool = True,
        total_steps: int | None = None,
        workers: int | None = None,
        seed: int = 0,
        aggregation: Aggregation | None = None,
        token_weighting: bool = True,
        participation: int | None = None,
        participation_seed: int = 0,
        offload: bool = False,
    ):
        if mode == "dp":
            raise SettingError("mode", mode, "DiLoCo is diloco or streaming; use DataParallel (or make_strategy) for dp")
        groups = len(fragment_groups) if fragment_groups is not None else fragments
        check_schedule(mode, inner_steps=inner_steps, fragments=groups, sync_delay=sync_delay, mixing=mixing)
        if error_feedback and stochastic_rounding:
            raise SettingError("error_feedback", error_feedback, "needs round-to-nearest: set stochastic_rounding=False")
        super().__init__(model, inner_optimizer, comm, exchange=exchange, workers=workers)
        self.mode = mode
        self.inner_steps = inner_steps
        self.sync_delay = sync_delay
        self.mixing = float(mixing) if mixing is not None else default_mixing(sync_delay)
        # unknown codec names and bad block sizes raise ValueError here
        self.codec = get_codec(codec, block_size=codec_block_size, stochastic_rounding=stochastic_rounding)
        self.error_feedback = bool(error_feedback) and self.codec.name != "fp32"
        if not 0.0 <= error_feedback_decay <= 1.0:
            raise SettingError("error_feedback_decay", error_feedback_decay, "must be in [0, 1]")
        self.error_feedback_decay = float(error_feedback_decay)

        self.fragments: list[Fragment] = build_fragments(model, fragments, fragment_pattern, fragment_groups)
        self.num_fragments = len(self.fragments)
        self.offsets = fragment_offsets(inner_steps, self.num_fragments)

        # θ_g: the anchor (global) parameters, fp32, and the outer optimizer, per fragment
        factory = outer_optimizer or outer_sgd(outer_lr, outer_momentum, outer_nesterov)
        # (a sharded, FSDP2, parameter: this rank's shard; farsync.comm.site)
        self.offload = bool(offload)
        self.outer = [OuterStep([self._anchor(p) for p in f.params], factory) for f in self.fragments]
        # error feedback: per fragment, what the codec dropped from the last payload sent
        self.residuals: list[torch.Tensor | None] = [None] * self.num_fragments

        device = self.outer[0].anchors[0].device  # where pseudo-gradients are formed and encoded
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed * 1_000_003 + comm.rank)
        self.final_average = final_average
        self.total_steps = total_steps
        self._pending: dict[int, tuple[Work, int, bool]] = {}  # fragment -> (work, step sent, final)
        self._final_launched = False

        self.aggregation = aggregation if aggregation is not None else Aggregation()
        self.token_weighting = bool(token_weighting)
        if participation is not None and not 1 <= participation <= comm.world_size:
            raise SettingError("participation", participation, f"must be in [1, {comm.world_size}] (the workers)")
        self.participation = participation
        self.participation_seed = participation_seed
        self._tokens = [0] * self.num_fragments  # per fragment: tokens trained on since its last send

    # ---- schedule -------------------------------------------------------------------
    def due_to_send(self, step: int) -> list[int]:
        """Fragments whose exchange starts after inner step ``step``."""
        return due_fragments(step, self.inner_steps, self.num_fragments)

    @property
    def in_flight(self) -> list[int]:
        return sorted(self._pending)

    @property
    def anchors(self) -> list[list[torch.Tensor]]:
        """θ_g: per fragment, its anchor parameters (fp32)."""
        return [o.anchors for o in self.outer]

    @property
    def outer_optimizers(self) -> list[torch.optim.Optimizer]:
        return [o.optimizer for o in self.outer]

    # ---- phases ---------------------------------------------------------------------
    def inner_step(self, tokens: int | None = None) -> None:
        """Inner optimizer step on ``tokens`` tokens (None: counts as 1), then start the
        exchanges of fragments due now."""
        self.inner_optimizer.step()
        self.stats.inner_steps += 1
        n = 1 if tokens is None else int(tokens)
        self.stats.tokens += n
        self._tokens = [t + n for t in self._tokens]
        self._advance()

    def idle_step(self) -> None:
        """A schedule step this worker did not train (it is slower than the schedule):
        fragments due now are still sent, weighted by what was trained since."""
        self.stats.idle_steps += 1
        self._advance()

    def _advance(self) -> None:
        self.step_count += 1
        for f in self.due_to_send(self.step_count):
            self._launch_fragment(f)

    def round_of(self, f: int, step: int) -> int:
        """Which round of fragment ``f`` a send after schedule step ``step`` closes (1-based)."""
        return (step - self.offsets[f]) // self.inner_steps

    def participates(self, f: int, round: int, rank: int | None = None) -> bool:
        """Whether worker ``rank`` (default: this one) is sampled into round ``round`` of
        fragment ``f`` (see ``participation``)."""
        chosen = sample_participants(self.participation, range(self.comm.world_size), self.participation_seed, f, round)
        return (self.comm.rank if rank is None else rank) in chosen

    def complete(self) -> None:
        """Land every fragment sent τ steps ago (outer step + merge)."""
        for f in sorted(self._pending):
            _, sent, _ = self._pending[f]
            if self.step_count >= sent + self.sync_delay:
                self._complete_fragment(f)

    def last_sent(self, f: int) -> int:
        """The inner step after which fragment ``f`` was last sent (0: never)."""
        t, H = self.offsets[f], self.inner_steps
        return 0 if self.step_count < H + t else t + H * ((self.step_count - t) // H)

    def launch_final(self) -> None:
        """Send every fragment trained since its last send (end of training)."""
        if self._final_launched:
            return
        self._final_launched = True
        for f in range(self.num_fragments):
            if f not in self._pending and self.last_sent(f) < self.step_count:
                self._launch_fragment(f, final=True)

    def finish(self) -> None:
        """Bring θ_g up to date with every inner step and land everything in flight
        (call once, at the end of training; see ``final_average``)."""
        self.launch_final()
        for f in sorted(self._pending):
            self._complete_fragment(f)

    @torch.no_grad()
    def global_parameters(self) -> dict[str, torch.Tensor]:
        """θ_g by parameter name: each fragment's anchor (the model the outer optimizer
        holds — what DiLoCo evaluates)."""
        out = super().global_parameters()
        for frag, anchors in zip(self.fragments, self.anchors):
            for name, p, a in zip(frag.names, frag.params, anchors):
                out[name] = full(a, p)  # a sharded parameter's anchor is this rank's shard
        return out

    # ---- fragments ------------------------------------------------------------------
    def _anchor(self, p: torch.Tensor) -> torch.Tensor:
        """A new fp32 anchor holding ``p``'s values: beside it, or in (pinned) CPU memory
        with ``offload``."""
        p = local(p).detach()
        if not self.offload or p.device.type == "cpu":
            return p.to(torch.float32, copy=True)
        a = torch.empty(p.shape, dtype=torch.float32, pin_memory=torch.cuda.is_available())
        return a.copy_(p)

    @torch.no_grad()
    def _launch_fragment(self, f: int, final: bool = False) -> None:
        frag = self.fragments[f]
        anchors = self.anchors[f]
        delta = flatten(anchors).sub_(flatten(frag.params, anchors[0].device))  # Δ_m = θ_g − θ_m
        weight = float(self._tokens[f]) if self.token_weighting else float(self._tokens[f] > 0)
        if not final and not self.participates(f, self.round_of(f, self.step_count)):
            weight = 0.0  # sits this round out: sends nothing, still lands θ_g
        self._tokens[f] = 0
        if self.error_feedback:  # codec blocks never straddle the exchange's shards: Q is what the payload decodes to
            delta, self.residuals[f] = compensate(self.codec, delta, self.residuals[f], self.error_feedback_decay,
                                                  sends=weight > 0)
        work = self._start(delta, self.codec, round=("fragment", f, self.step_count), generator=self.generator,
                           weight=weight, aggregation=self.aggregation)
        final = final or (self.total_steps is not None and self.step_count >= self.total_steps)
        self._pending[f] = (work, self.step_count, final)

    @torch.no_grad()
    def _complete_fragment(self, f: int) -> None:
        work, sent, final = self._pending.pop(f)
        res = self._wait(work)
        self.stats.record_event(res.bytes_sent, res.control_bytes, res.site_bytes)
        self._record(f, sent, res)
        outer = self.outer[f]
        alpha = 0.0  # skipped: θ_g stays, replicas return to it; a final average: every replica takes it
        if not res.skipped:
            plain = final and self.final_average
            outer.land(res.mean, plain_mean=plain)  # θ_g,p ← OuterOpt(θ_g,p, Δ_p), or θ_g,p − Δ̄_p
            alpha = 0.0 if plain else self.mixing
        for p, a in zip(self.fragments[f].params, outer.anchors):
            p = local(p)
            if alpha == 0.0:
                p.copy_(a)  # exact copy: replicas become bit-identical
            else:
                p.mul_(alpha).add_(a.to(p.device, p.dtype), alpha=1.0 - alpha)

    def _record(self, f: int, sent: int, res: ExchangeResult) -> None:
        """Count this worker's part in the round; keep who was left out and why."""
        me, rnd = self.comm.rank, self.round_of(f, sent)
        excluded = dict(res.excluded)
        kept = list(res.kept) if res.kept is not None else list(range(self.comm.world_size))
        self._note("sync", {"fragment": f, "round": rnd, "step": sent, "kept": kept,
                            "sat_out": [r for r, w in enumerate(res.weights) if w == 0],
                            "excluded": sorted(excluded), "skipped": res.skipped})
        if me in excluded:
            self.stats.rounds_excluded += 1
        elif res.weights[me] == 0:
            self.stats.rounds_sat_out += 1
        elif not res.skipped:
            self.stats.rounds_joined += 1
        for r, why in res.excluded:
            self._note("excluded", {"worker": r, "fragment": f, "round": rnd, "step": sent, "why": why})
        if res.skipped:
            self.stats.rounds_skipped += 1
            self._note("skipped", {"fragment": f, "round": rnd, "step": sent, "kept": kept})

    # ---- state ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Anchors, outer optimizer states, fragments in flight, step counter, RNG and
        accounting. A fragment in flight is waited for and stored with its result, so a
        resumed run lands it at the same step with the same values."""
        pending = []
        for f in sorted(self._pending):
            work, sent, final = self._pending[f]
            res = work.wait()
            self._pending[f] = (CompletedWork(res), sent, final)
            pending.append({
                "fragment": f, "sent_step": sent, "final": final, "mean": res.mean.clone(), "weights": list(res.weights),
                "bytes_sent": res.bytes_sent, "control_bytes": res.control_bytes,
                "kept": res.kept, "excluded": list(res.excluded), "skipped": res.skipped,
            })
        return {
            **super().state_dict(),
            "fragment_names": [f.names for f in self.fragments],
            "anchors": [[a.clone() for a in fa] for fa in self.anchors],
            "outer_optimizers": [o.state_dict() for o in self.outer_optimizers],
            "pending": pending,
            "generator": self.generator.get_state(),
            "residuals": [None if r is None else r.clone() for r in self.residuals],
            "tokens_since_sync": list(self._tokens),
        }

    @torch.no_grad()
    def shared_state(self) -> dict:
        """What every worker holds alike — θ_g and the outer optimizer of every fragment,
        the schedule position, the exclusion record — as copies: what a worker that
        joins mid-run receives from a live one (elastic runs; call at a sync, with
        nothing in flight but the sync itself)."""
        return {
            "mode": self.mode, "step": self.step_count, "fragment_names": [f.names for f in self.fragments],
            "anchors": [[a.clone() for a in fa] for fa in self.anchors],
            "outer_optimizers": [copy.deepcopy(o.state_dict()) for o in self.outer_optimizers],
            "exclusions": list(self.exclusions), "skipped_rounds": list(self.skipped_rounds),
        }

    @torch.no_grad()
    def adopt(self, state: dict, landing: tuple[int, int, ExchangeResult] | None = None) -> None:
        """Continue from a live worker's :meth:`shared_state`: θ_g, outer optimizers and
        schedule position replaced, this worker's replicas set to θ_g, what it trained
        since its last sync dropped (error-feedback residuals too). ``landing`` =
        (fragment, step sent, result): the sync the live workers were in, landed here
        as there. The inner optimizer's state and the accounting stay this worker's."""
        if state["mode"] != self.mode or state["fragment_names"] != [f.names for f in self.fragments]:
            raise ValueError("a live worker's state is for another model, mode or fragmentation than this run's")
        self._pending.clear()
        for frag, outer, anchors, opt in zip(self.fragments, self.outer, state["anchors"], state["outer_optimizers"]):
            outer.load(anchors, opt)
            for p, a in zip(frag.params, outer.anchors):
                local(p).copy_(a)
        self.step_count = int(state["step"])
        self.exclusions, self.skipped_rounds = list(state["exclusions"]), list(state["skipped_rounds"])
        self._tokens = [0] * self.num_fragments
        self.residuals = [None] * self.num_fragments
        self._final_launched = False
        if landing is not None:
            f, sent, result = landing
            final = self.total_steps is not None and sent >= self.total_steps
            self._pending[f] = (CompletedWork(result), sent, final)
            self._complete_fragment(f)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        names = [f.names for f in self.fragments]
        if state["fragment_names"] != names:
            raise ValueError("checkpoint fragments differ from this run's (model or fragments changed)")
        for outer, anchors, opt in zip(self.outer, state["anchors"], state["outer_optimizers"]):
            outer.load(anchors, opt)
        for item in state["pending"]:
            res = ExchangeResult(item["mean"], tuple(item["weights"]), item["bytes_sent"], item["control_bytes"],
                                 item.get("kept"), tuple(tuple(e) for e in item.get("excluded", ())),
                                 item.get("skipped", False))
            self._pending[item["fragment"]] = (CompletedWork(res), item["sent_step"], item["final"])
        self.generator.set_state(state["generator"])
        self.residuals = [None if r is None else r.clone() for r in state.get("residuals", self.residuals)]
        self._tokens = list(state.get("tokens_since_sync", self._tokens))
