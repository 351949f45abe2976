"""The communication seam (see :mod:`farsync.comm.base`), its two backends, and how the
workers of a run find each other (:mod:`farsync.comm.rendezvous`)."""

from farsync.comm.base import CompletedWork, Communicator, ExchangeRequest, ExchangeResult, Work
from farsync.comm.exchange import ExchangePlan, make_plan
from farsync.comm.inprocess import InProcessCommunicator, InProcessGroup

__all__ = [
    "CompletedWork",
    "Communicator",
    "ExchangePlan",
    "ExchangeRequest",
    "ExchangeResult",
    "InProcessCommunicator",
    "InProcessGroup",
    "Work",
    "make_plan",
    "TorchDistributedCommunicator",
]


def __getattr__(name: str):
    # imported lazily: torch.distributed is only needed for multi-process runs
    if name == "TorchDistributedCommunicator":
        from farsync.comm.distributed import TorchDistributedCommunicator

        return TorchDistributedCommunicator
    raise AttributeError(name)
