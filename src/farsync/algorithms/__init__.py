"""Training methods behind one phase protocol: data-parallel, DiLoCo and Streaming DiLoCo.

    strategy    the protocol (phases, events, state), step_in_lockstep, finish_in_lockstep
    dp          DataParallel: the gradient mean every step
    diloco      DiLoCo: pseudo-gradients of P fragments, overlap, codecs
    outer       the outer step and the participation sample (shared with federated runs)
    methods     make_strategy: the method by name
    fragments   which parameters each fragment holds
    accounting  bytes sent and time spent, per worker
"""

from farsync.algorithms.accounting import CommStats, dp_bytes_per_step
from farsync.algorithms.diloco import DiLoCo
from farsync.algorithms.dp import DataParallel
from farsync.algorithms.fragments import Fragment, build_fragments, find_blocks
from farsync.algorithms.methods import make_strategy
from farsync.algorithms.outer import OuterStep, outer_sgd, sample_participants
from farsync.algorithms.strategy import Strategy, finish_in_lockstep, step_in_lockstep

__all__ = [
    "CommStats",
    "DataParallel",
    "DiLoCo",
    "Fragment",
    "OuterStep",
    "Strategy",
    "build_fragments",
    "dp_bytes_per_step",
    "find_blocks",
    "finish_in_lockstep",
    "make_strategy",
    "outer_sgd",
    "sample_participants",
    "step_in_lockstep",
]
