"""DiLoCo and Streaming DiLoCo around an unchanged inner optimizer — and the
data-parallel baseline through the same code path.

Papers: DiLoCo, Douillard et al. 2023 (arXiv 2311.08105); Streaming DiLoCo, Douillard et
al. 2025 (arXiv 2501.18512).

Symbols → arguments:

=========  ==========================  =================================================
symbol     argument                    meaning
=========  ==========================  =================================================
M          ``comm.world_size``         workers (replicas); ``num_workers`` checks it
H          ``sync_every``              inner steps between two syncs of a fragment
P          ``num_fragments``           fragments synced at staggered offsets t_p = p·H/P
τ          ``sync_delay``              inner steps run while a fragment is in flight
α          ``mixing``                  θ_m ← α·θ_m + (1−α)·θ̃ when a sync lands
η_outer    ``outer_lr``                outer SGD learning rate (0.7 in the papers)
μ_outer    ``outer_momentum``          outer Nesterov momentum (0.9)
=========  ==========================  =================================================

One object per worker. A training step is four phases, which :meth:`DiLoCo.step` runs
in order; a driver that simulates M workers in one process runs each phase for every
worker before the next phase (see :mod:`farsync.train.loop`):

1. :meth:`launch_gradient_sync` — DP only: start the mean of the gradients.
2. :meth:`wait_gradient_sync` — DP only: wait and write averaged gradients back.
   (``sync_gradients()`` = 1 + 2; clip gradients after it if you clip.)
3. :meth:`inner_step` — the inner optimizer's step; then every fragment due at this
   step computes its pseudo-gradient Δ_p = θ_g,p − θ_m,p and starts its exchange.
4. :meth:`complete_syncs` — every fragment sent τ steps ago: wait for the mean Δ_p,
   take the outer step θ̃_p = OuterOpt_p(θ_g,p, Δ_p), set θ_g,p ← θ̃_p and merge the
   local copy θ_m,p ← α·θ_m,p + (1−α)·θ̃_p.

Inner optimizer state never leaves the worker.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from farsync.algorithms.accounting import CommStats
from farsync.algorithms.fragments import Fragment, build_fragments, flatten, unflatten_into
from farsync.codecs import get_codec
from farsync.comm import exchange as ex
from farsync.comm.base import CompletedWork, Communicator, ExchangeResult, Work

MODES = ("dp", "diloco", "streaming")

OuterOptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def fragment_offsets(sync_every: int, num_fragments: int) -> list[int]:
    """t_p = ⌊p·H/P⌋: fragment p syncs at steps k·H + t_p, k ≥ 1."""
    return [p * sync_every // num_fragments for p in range(num_fragments)]


def min_sync_gap(sync_every: int, num_fragments: int) -> int:
    """Fewest inner steps between two consecutive fragment sends; τ must stay below it
    so that at most one fragment is in flight (it is H/P when P divides H)."""
    t = fragment_offsets(sync_every, num_fragments)
    return min(b - a for a, b in zip(t, t[1:] + [sync_every + t[0]]))


def sync_steps(sync_every: int, num_fragments: int, fragment: int, until: int) -> list[int]:
    """The inner steps (1-based counts of completed steps) at which ``fragment`` is sent."""
    t = fragment_offsets(sync_every, num_fragments)[fragment]
    return list(range(sync_every + t, until + 1, sync_every))


class DiLoCo:
    """One worker's side of DP / DiLoCo / Streaming DiLoCo.

    Example (one process per worker under torchrun)::

        comm = TorchDistributedCommunicator()
        algo = DiLoCo(model, torch.optim.AdamW(model.parameters(), lr=4e-4), comm,
                      mode="streaming", sync_every=100, num_fragments=4, sync_delay=1,
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
        mode: ``"dp"`` (gradient mean every step), ``"diloco"`` (P = 1, τ = 0, α = 0) or
            ``"streaming"``.
        sync_every: H, inner steps per round.
        num_fragments: P (streaming only).
        fragment_pattern: ``"strided"`` (paper default) or ``"sequential"``.
        fragments: explicit fragments (name patterns or modules), overriding P/pattern.
        sync_delay: τ, inner steps overlapped with a fragment's exchange; τ < H/P.
        mixing: α in [0, 1]; default 0 when τ = 0 (replace, as DiLoCo) and 0.5 when
            τ ≥ 1 (the paper's uniform mix of local and global values).
        codec: pseudo-gradient codec (``fp32``, ``bf16``, ``int8``, ``fp4-e3m0``,
            ``fp4-e2m1``). DP gradients always travel as fp32.
        codec_block_size: values per codec scale block (codec default when None).
        stochastic_rounding: stochastic instead of round-to-nearest quantization.
        exchange: ``"auto"``, ``"reduce-scatter"`` or ``"all-gather"``
            (see :mod:`farsync.comm.exchange`).
        outer_optimizer: factory ``params -> Optimizer`` for each fragment's outer
            optimizer; default SGD(lr=outer_lr, momentum=outer_momentum, nesterov).
        num_workers: expected M; a communicator of another size is an error.
        seed: seeds this worker's stochastic-rounding generator (with its rank).
    """

    def __init__(
        self,
        model: nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        comm: Communicator,
        *,
        mode: str = "streaming",
        sync_every: int = 100,
        num_fragments: int = 1,
        fragment_pattern: str = "strided",
        fragments: list[list] | None = None,
        sync_delay: int = 0,
        mixing: float | None = None,
        codec: str = "fp32",
        codec_block_size: int | None = None,
        stochastic_rounding: bool = False,
        exchange: str = "auto",
        outer_optimizer: OuterOptimizerFactory | None = None,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        outer_nesterov: bool = True,
        num_workers: int | None = None,
        seed: int = 0,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
        if num_workers is not None and num_workers != comm.world_size:
            raise ValueError(
                f"num_workers (M) = {num_workers} but the communicator has world size "
                f"{comm.world_size}; launch {num_workers} workers or set num_workers={comm.world_size}"
            )
        if exchange not in ex.METHODS:
            raise ValueError(f"exchange must be one of {', '.join(ex.METHODS)} (got {exchange!r})")
        if mode == "diloco":
            if num_fragments != 1 or fragments is not None:
                raise ValueError(f"mode 'diloco' syncs all parameters at once: num_fragments must be 1 (got {num_fragments}); use mode 'streaming'")
            if sync_delay != 0:
                raise ValueError(f"mode 'diloco' has no overlap: sync_delay must be 0 (got {sync_delay}); use mode 'streaming'")
            if mixing not in (None, 0, 0.0):
                raise ValueError(f"mode 'diloco' replaces local parameters: mixing must be 0 (got {mixing}); use mode 'streaming'")
        if mode != "dp":
            if not isinstance(sync_every, int) or sync_every < 1:
                raise ValueError(f"sync_every (H) must be an integer >= 1 (got {sync_every!r})")
            if not isinstance(sync_delay, int) or sync_delay < 0:
                raise ValueError(f"sync_delay (τ) must be an integer >= 0 (got {sync_delay!r})")
        if mixing is not None and not (0.0 <= mixing <= 1.0):
            raise ValueError(f"mixing (α) must be in [0, 1] (got {mixing})")

        self.model = model
        self.inner_optimizer = inner_optimizer
        self.comm = comm
        self.mode = mode
        self.sync_every = sync_every
        self.sync_delay = sync_delay if mode != "dp" else 0
        self.mixing = float(mixing) if mixing is not None else (0.5 if self.sync_delay > 0 else 0.0)
        self.exchange = exchange
        # unknown codec names and bad block sizes raise ValueError here
        self.codec = get_codec(
            codec, **({"block_size": codec_block_size} if codec_block_size else {}),
            stochastic_rounding=stochastic_rounding,
        )
        self._fp32 = get_codec("fp32")

        self.params = [p for p in model.parameters() if p.requires_grad]
        owned = {id(p) for g in inner_optimizer.param_groups for p in g["params"]}
        stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owned]
        if stray:
            raise ValueError(f"inner_optimizer does not update parameter '{stray[0]}' of the model; pass all model parameters to it")

        if mode == "dp":
            self.fragments: list[Fragment] = []
        else:
            self.fragments = build_fragments(model, num_fragments, fragment_pattern, fragments)
        self.num_fragments = len(self.fragments)
        if mode != "dp":
            self.offsets = fragment_offsets(sync_every, self.num_fragments)
            gap = min_sync_gap(sync_every, self.num_fragments)
            if self.sync_delay >= gap:
                raise ValueError(
                    f"sync_delay (τ) = {self.sync_delay} must be < H/P = {sync_every}/{self.num_fragments} "
                    f"(here < {gap}), so that at most one fragment is in flight"
                )
        else:
            self.offsets = []

        # θ_g: the anchor (global) parameters, fp32, one list per fragment
        self.anchors: list[list[torch.Tensor]] = [
            [p.detach().to(torch.float32, copy=True) for p in f.params] for f in self.fragments
        ]
        factory = outer_optimizer or (
            lambda ps: torch.optim.SGD(ps, lr=outer_lr, momentum=outer_momentum, nesterov=outer_nesterov and outer_momentum > 0)
        )
        self.outer_optimizers = [factory(a) for a in self.anchors]

        device = self.params[0].device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed * 1_000_003 + comm.rank)

        self.step_count = 0  # inner steps completed
        self.stats = CommStats(comm.world_size, sum(p.numel() for p in self.params))
        self._pending: dict[int, tuple[Work, int]] = {}  # fragment -> (work, step sent)
        self._grad_work: Work | None = None
        self._grads_synced = False
        #: when True, compute time is measured as wall time between steps minus time
        #: blocked; a driver that interleaves several simulated workers sets it False
        #: and adds its own measurements to ``stats.compute_seconds``.
        self.auto_time = True
        self._last_mark: float | None = None

    # ---- schedule -------------------------------------------------------------------
    def due_to_send(self, step: int) -> list[int]:
        """Fragments whose exchange starts after inner step ``step``."""
        H = self.sync_every
        return [f for f, t in enumerate(self.offsets) if step - t >= H and (step - t) % H == 0]

    @property
    def in_flight(self) -> list[int]:
        return sorted(self._pending)

    # ---- phases ---------------------------------------------------------------------
    def launch_gradient_sync(self) -> None:
        """DP: start the mean of this worker's gradients (no-op in other modes)."""
        if self.mode != "dp" or self._grad_work is not None:
            return
        self._mark_compute()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        buf = flatten(grads)
        weight = 1.0 if bool(torch.isfinite(buf).all()) else float("nan")
        self._grad_work = self.comm.all_reduce_mean(buf, self._fp32, weight=weight, method=self.exchange)

    def wait_gradient_sync(self) -> None:
        """DP: wait for the gradient mean and write it into ``p.grad``."""
        if self._grad_work is None:
            return
        res = self._wait(self._grad_work)
        self._grad_work = None
        if res.invalid_ranks:
            raise FloatingPointError(
                f"non-finite gradient on worker(s) {res.invalid_ranks} at step {self.step_count + 1}; stopping"
            )
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        unflatten_into(res.mean, [p.grad for p in self.params])
        self.stats.record_event(res.bytes_sent, res.control_bytes)
        self._grads_synced = True

    def sync_gradients(self) -> None:
        """DP: average gradients now (call before clipping); no-op in other modes."""
        self.launch_gradient_sync()
        self.wait_gradient_sync()

    def inner_step(self) -> None:
        """Inner optimizer step, then start the exchanges of fragments due now."""
        if self.mode == "dp" and not self._grads_synced:
            self.sync_gradients()
        self._mark_compute()
        self.inner_optimizer.step()
        self._grads_synced = False
        self.step_count += 1
        self.stats.inner_steps = self.step_count
        for f in self.due_to_send(self.step_count):
            self._launch_fragment(f)
        self._mark_compute()

    def complete_syncs(self) -> None:
        """Land every fragment sent τ steps ago (outer step + merge)."""
        for f in sorted(self._pending):
            _, sent = self._pending[f]
            if self.step_count >= sent + self.sync_delay:
                self._complete_fragment(f)
        self._last_mark = time.perf_counter() if self.auto_time else None

    def step(self) -> None:
        """One full training step for this worker: phases 1–4."""
        self.sync_gradients()
        self.inner_step()
        self.complete_syncs()

    def finish(self) -> None:
        """Land all fragments still in flight (call at the end of training)."""
        for f in sorted(self._pending):
            self._complete_fragment(f)

    # ---- fragments ------------------------------------------------------------------
    @torch.no_grad()
    def _launch_fragment(self, f: int) -> None:
        frag = self.fragments[f]
        delta = flatten(self.anchors[f]).sub_(flatten(frag.params))  # Δ_m = θ_g − θ_m
        weight = 1.0 if bool(torch.isfinite(delta).all()) else float("nan")
        work = self.comm.all_reduce_mean(
            delta, self.codec, weight=weight, generator=self.generator, method=self.exchange
        )
        self._pending[f] = (work, self.step_count)

    @torch.no_grad()
    def _complete_fragment(self, f: int) -> None:
        work, sent = self._pending.pop(f)
        res = self._wait(work)
        if res.invalid_ranks:
            raise FloatingPointError(
                f"non-finite pseudo-gradient from worker(s) {res.invalid_ranks} in fragment {f} "
                f"(sent after inner step {sent}); stopping before it poisons the global model"
            )
        self.stats.record_event(res.bytes_sent, res.control_bytes)
        anchors, opt = self.anchors[f], self.outer_optimizers[f]
        mean = res.mean.to(anchors[0].device)
        offset = 0
        for a in anchors:
            n = a.numel()
            a.grad = mean[offset: offset + n].view_as(a)
            offset += n
        opt.step()  # θ_g,p ← OuterOpt(θ_g,p, Δ_p)
        for a in anchors:
            a.grad = None
        alpha = self.mixing
        for p, a in zip(self.fragments[f].params, anchors):
            if alpha == 0.0:
                p.copy_(a)  # exact copy: replicas become bit-identical
            else:
                p.mul_(alpha).add_(a.to(p.dtype), alpha=1.0 - alpha)

    def _wait(self, work: Work) -> ExchangeResult:
        t0 = time.perf_counter()
        res = work.wait()
        dt = time.perf_counter() - t0
        self.stats.blocked_seconds += dt
        if self._last_mark is not None:
            self._last_mark += dt  # blocked time is not compute time
        return res

    def _mark_compute(self) -> None:
        if not self.auto_time:
            return
        now = time.perf_counter()
        if self._last_mark is not None:
            self.stats.compute_seconds += now - self._last_mark
        self._last_mark = now

    @torch.no_grad()
    def global_parameters(self) -> dict[str, torch.Tensor]:
        """θ_g by parameter name: each fragment's anchor (the model the outer optimizer
        holds — what DiLoCo evaluates); in DP mode, the worker's own parameters."""
        out = {n: p.detach() for n, p in self.model.named_parameters()}
        for frag, anchors in zip(self.fragments, self.anchors):
            for name, a in zip(frag.names, anchors):
                out[name] = a
        return out

    # ---- state ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Anchors, outer optimizer states, fragments in flight, step counter, RNG and
        accounting. A fragment in flight is waited for and stored with its result, so a
        resumed run lands it at the same step with the same values."""
        pending = []
        for f in sorted(self._pending):
            work, sent = self._pending[f]
            res = work.wait()
            self._pending[f] = (CompletedWork(res), sent)
            pending.append({
                "fragment": f, "sent_step": sent, "mean": res.mean.clone(), "weights": list(res.weights),
                "bytes_sent": res.bytes_sent, "control_bytes": res.control_bytes,
            })
        return {
            "format": 1,
            "mode": self.mode,
            "step": self.step_count,
            "fragment_names": [f.names for f in self.fragments],
            "anchors": [[a.clone() for a in fa] for fa in self.anchors],
            "outer_optimizers": [o.state_dict() for o in self.outer_optimizers],
            "pending": pending,
            "generator": self.generator.get_state(),
            "stats": self.stats.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(f"checkpoint is for mode {state.get('mode')!r}, this run is {self.mode!r}")
        names = [f.names for f in self.fragments]
        if state["fragment_names"] != names:
            raise ValueError("checkpoint fragments differ from this run's (model or num_fragments changed)")
        if self._pending or self._grad_work is not None:
            raise RuntimeError("load_state_dict while exchanges are in flight")
        self.step_count = int(state["step"])
        for fa, sa in zip(self.anchors, state["anchors"]):
            for a, s in zip(fa, sa):
                a.copy_(s)
        for o, s in zip(self.outer_optimizers, state["outer_optimizers"]):
            o.load_state_dict(s)
        for item in state["pending"]:
            res = ExchangeResult(item["mean"], tuple(item["weights"]), item["bytes_sent"], item["control_bytes"])
            self._pending[item["fragment"]] = (CompletedWork(res), item["sent_step"])
        self.generator.set_state(state["generator"])
        self.stats.load_dict(state["stats"])


def step_in_lockstep(
    algos: list[DiLoCo], before_inner_step: Callable[[DiLoCo], None] | None = None
) -> None:
    """Run one training step's phases for several simulated workers in one thread.

    Call after every worker's backward pass. Each phase runs for all workers before the
    next, so every exchange has all M contributions before anyone waits on it — the
    in-process analogue of ranks meeting in a collective. ``before_inner_step`` runs
    per worker between the gradient mean and the inner step (gradient clipping).
    """
    for a in algos:
        a.launch_gradient_sync()
    for a in algos:
        a.wait_gradient_sync()
        if before_inner_step is not None:
            before_inner_step(a)
    for a in algos:
        a.inner_step()
    for a in algos:
        a.complete_syncs()
