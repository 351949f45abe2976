"""farsync: DiLoCo and Streaming DiLoCo for training across slow links."""

from farsync.algorithms import DiLoCo, step_in_lockstep
from farsync.comm import InProcessGroup

__version__ = "0.1.0"

__all__ = ["DiLoCo", "InProcessGroup", "step_in_lockstep", "__version__"]
