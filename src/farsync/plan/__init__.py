"""Plan for the link you have: measure it, then choose H, P, τ and the codec.

    farsync train --algo.auto=true          # measure, choose, then train with the choice
    farsync plan                            # measure and choose only (under torchrun)

:mod:`farsync.plan.link` measures bandwidth and round trip over the run's process group,
:mod:`farsync.plan.choose` simulates every setting of the safe region and picks the one
sending the fewest bytes among those predicted to reach the target utilization,
:mod:`farsync.plan.run` ties both to a training run (``RUN/plan.json``).
"""

from farsync.plan.choose import DEFAULT_CODECS, Candidate, Plan, SafeRegion, choose, describe
from farsync.plan.link import LinkMeasurement, given_link, measure_link

__all__ = ["DEFAULT_CODECS", "Candidate", "LinkMeasurement", "Plan", "SafeRegion", "choose", "describe",
           "given_link", "measure_link"]
