"""What closes a round, wherever it runs: who takes part, and the outer step.

:func:`sample_participants` draws the K workers of a round (``participation``);
:class:`OuterStep` holds one fragment's θ_g and its outer optimizer and lands a mean
pseudo-gradient on them. :class:`~farsync.algorithms.diloco.DiLoCo` (every worker, all-to-
all) and the federated server and clients (:mod:`farsync.federated.core`) use these same
two, so a federated run and an all-to-all run of the same schedule take the same steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

OuterOptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def outer_sgd(lr: float, momentum: float, nesterov: bool = True) -> OuterOptimizerFactory:
    """The papers' outer optimizer: SGD with (Nesterov, unless ``nesterov`` is off)
    momentum; plain SGD when ``momentum`` is 0."""
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)


def sample_participants(k: int | None, candidates: Iterable[int], seed: int, fragment: int, round: int) -> list[int]:
    """The ``k`` of ``candidates`` (worker ranks or client ids) that take part in round
    ``round`` of fragment ``fragment``, sorted; all of them when k is None, 0 or at least
    their number. A function of its arguments only: every worker, backend and server
    draws the same."""
    ids = sorted(candidates)
    if not k or k >= len(ids):
        return ids
    g = torch.Generator().manual_seed(seed * 1_000_003 + fragment * 10_007 + round)
    return sorted(ids[i] for i in torch.randperm(len(ids), generator=g)[:k].tolist())


class OuterStep:
    """θ_g of one fragment (fp32 anchors) and its outer optimizer.

    :meth:`land` applies a round's mean pseudo-gradient Δ̄: θ_g ← OuterOpt(θ_g, Δ̄), or —
    for the final syncs with ``algo.final_average`` — θ_g ← θ_g − Δ̄, the workers' plain
    mean, so that the model kept is not an extrapolation of the outer momentum.
    """

    def __init__(self, anchors: list[torch.Tensor], make_optimizer: OuterOptimizerFactory):
        self.anchors = anchors
        self.optimizer = make_optimizer(anchors)

    @property
    def numel(self) -> int:
        return sum(a.numel() for a in self.anchors)

    @torch.no_grad()
    def land(self, mean: torch.Tensor, *, plain_mean: bool = False) -> None:
        """One round: ``mean`` is Δ̄ as one flat fp32 vector over the anchors in order."""
        mean = mean.to(self.anchors[0].device)
        offset = 0
        for a in self.anchors:
            n = a.numel()
            a.grad = mean[offset: offset + n].view_as(a)
            offset += n
        if plain_mean:
            for a in self.anchors:
                a.sub_(a.grad)
        else:
            self.optimizer.step()
        for a in self.anchors:
            a.grad = None

    @torch.no_grad()
    def load(self, anchors: list[torch.Tensor], optimizer_state: dict) -> None:
        """θ_g and the optimizer's state from a checkpoint or a live peer."""
        for a, s in zip(self.anchors, anchors):
            a.copy_(s)
        self.optimizer.load_state_dict(optimizer_state)
