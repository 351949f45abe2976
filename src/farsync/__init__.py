"""farsync: DiLoCo and Streaming DiLoCo for training across slow links.

The names below are imported on first use (PEP 562), so ``import farsync.sim`` (pure
Python) and ``python -m farsync.wan.guardian`` do not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "DiLoCo": "farsync.algorithms",
    "DataParallel": "farsync.algorithms",
    "make_strategy": "farsync.algorithms",
    "step_in_lockstep": "farsync.algorithms",
    "finish_in_lockstep": "farsync.algorithms",
    "InProcessGroup": "farsync.comm",
}

__all__ = [*_LAZY, "__version__"]

if TYPE_CHECKING:  # for type checkers and IDEs only
    from farsync.algorithms import DataParallel, DiLoCo, finish_in_lockstep, make_strategy, step_in_lockstep
    from farsync.comm import InProcessGroup


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'farsync' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
