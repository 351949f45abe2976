"""The methods by name: one flag chooses data-parallel, DiLoCo or Streaming DiLoCo."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from farsync.algorithms.diloco import DiLoCo
from farsync.algorithms.dp import DataParallel
from farsync.algorithms.strategy import Strategy
from farsync.comm.base import Communicator
from farsync.schedule import MODES, check_choice

#: What data-parallel takes of :func:`make_strategy`'s keywords; it ignores the rest of
#: DiLoCo's (H, P, τ, α, codec, outer optimizer, ...).
DP_KEYWORDS = ("exchange", "workers")
#: Every keyword :func:`make_strategy` accepts: DiLoCo's.
KEYWORDS = tuple(p for p in inspect.signature(DiLoCo).parameters if p not in ("model", "inner_optimizer", "comm", "mode"))


def make_strategy(
    model: nn.Module, inner_optimizer: torch.optim.Optimizer, comm: Communicator, *, mode: str = "streaming", **kwargs
) -> Strategy:
    """The strategy for ``mode``: :class:`~farsync.algorithms.dp.DataParallel` for ``dp``
    (which takes ``exchange`` and ``workers`` and ignores the keywords only DiLoCo has),
    :class:`~farsync.algorithms.diloco.DiLoCo` for ``diloco`` and ``streaming``."""
    check_choice("mode", mode, MODES)
    unknown = sorted(set(kwargs) - set(KEYWORDS))
    if unknown:
        raise TypeError(f"make_strategy() got an unexpected keyword argument {unknown[0]!r}")
    if mode == "dp":
        return DataParallel(model, inner_optimizer, comm, **{k: v for k, v in kwargs.items() if k in DP_KEYWORDS})
    return DiLoCo(model, inner_optimizer, comm, mode=mode, **kwargs)
