"""DP, DiLoCo and Streaming DiLoCo (one code path) and fragment assignment."""

from farsync.algorithms.accounting import CommStats, dp_bytes_per_step
from farsync.algorithms.diloco import MODES, DiLoCo, fragment_offsets, step_in_lockstep, sync_steps
from farsync.algorithms.fragments import Fragment, build_fragments, find_blocks

__all__ = [
    "MODES",
    "CommStats",
    "DiLoCo",
    "Fragment",
    "build_fragments",
    "dp_bytes_per_step",
    "find_blocks",
    "fragment_offsets",
    "step_in_lockstep",
    "sync_steps",
]
