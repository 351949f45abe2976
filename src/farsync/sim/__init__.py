"""Compute-utilization simulator (Streaming DiLoCo, arXiv 2501.18512, §3.1 and Table 4).

"With this link between sites, how much of my compute will I actually use?" Pure Python:
a per-step DAG of forward / backward / reduction nodes per layer, scheduled on one
compute stream and one inter-worker link (see `farsync.sim.engine`).

    from farsync.sim import preset, method_config, simulate, required_bandwidth
    cfg = method_config(preset("1b"), "streaming-overlap", bandwidth_gbps=5.0)
    simulate(cfg).utilization            # 0.84
    required_bandwidth(cfg, 0.95)        # Gbit/s, on the paper's grid
"""

from farsync.sim.engine import (
    DEFAULT_CODEC,
    DEFAULT_WORKERS,
    LATENCY_MODELS,
    LINKS,
    METHOD_LABELS,
    METHODS,
    REDUCTIONS,
    SimConfig,
    SimResult,
    exchange_phases,
    method_config,
    simulate,
    slow_start_extra_s,
    with_bandwidth,
)
from farsync.sim.model import (
    LAYERS_PER_FRAGMENT,
    PAPER_INNER_STEPS,
    PRESETS,
    ModelSpec,
    SimInputError,
    preset,
)
from farsync.sim.planner import (
    FINE_GRID,
    GRIDS,
    PAPER_GRID,
    PAPER_TABLE4_1B,
    TARGETS,
    grid_index,
    grid_step_errors,
    json_table,
    markdown_table,
    required_bandwidth,
    required_table,
    utilization,
    utilization_curve,
)
from farsync.sim.wire import WIRE_FORMATS, WireFormat, wire_format

__all__ = [
    "DEFAULT_CODEC", "DEFAULT_WORKERS", "FINE_GRID", "GRIDS",
    "LATENCY_MODELS", "LAYERS_PER_FRAGMENT", "LINKS", "METHOD_LABELS", "METHODS", "PAPER_GRID", "PAPER_INNER_STEPS",
    "PAPER_TABLE4_1B", "PRESETS", "REDUCTIONS", "TARGETS", "WIRE_FORMATS",
    "ModelSpec", "SimConfig", "SimInputError", "SimResult", "WireFormat", "exchange_phases", "grid_index",
    "grid_step_errors", "json_table", "markdown_table", "method_config", "preset",
    "required_bandwidth", "required_table", "simulate", "slow_start_extra_s", "utilization", "utilization_curve",
    "wire_format", "with_bandwidth",
]
