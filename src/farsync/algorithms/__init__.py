"""Training methods behind one phase protocol: data-parallel, DiLoCo and Streaming DiLoCo.

    strategy    the protocol (phases, blocked-time clock, state), make_strategy, step_in_lockstep
    dp          DataParallel: the gradient mean every step
    diloco      DiLoCo: pseudo-gradients of P fragments, outer optimizer, overlap, codecs
    fragments   which parameters each fragment holds
    accounting  bytes sent and time spent, per worker
"""

from farsync.algorithms.accounting import CommStats, dp_bytes_per_step
from farsync.algorithms.diloco import DiLoCo
from farsync.algorithms.dp import DataParallel
from farsync.algorithms.fragments import Fragment, build_fragments, find_blocks
from farsync.algorithms.strategy import Strategy, finish_in_lockstep, make_strategy, step_in_lockstep

__all__ = [
    "CommStats",
    "DataParallel",
    "DiLoCo",
    "Fragment",
    "Strategy",
    "build_fragments",
    "dp_bytes_per_step",
    "find_blocks",
    "finish_in_lockstep",
    "make_strategy",
    "step_in_lockstep",
]
