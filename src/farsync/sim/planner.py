"""Planner questions on top of the simulator: which bandwidth reaches a utilization, and
the Streaming DiLoCo Table 4 reproduction.

The paper's bandwidth grid. Table 4 reports bandwidths such as 1.4, 1.7, 2.0, 2.4, …,
152.6, 184.2, 222.3, …, 569.0 Gbit/s. They are consecutive points of the geometric grid
``numpy.geomspace(0.1, 1000, 50)`` (ratio 10^(4/49) ≈ 1.2068, a little under 10^(1/12)):
20 of the 24 distinct values in the issue's 1B row equal a grid point rounded to 0.1; the
other four are within rounding of one (86.85 printed 86.8, 6.25 as 6.2, 2.95 as 3.0) or,
for 0.9, between the points 0.79 and 0.95 (nearest in log distance: 0.95). "Required
bandwidth" is the smallest grid point whose utilization reaches the target, None if even
1000 Gbit/s does not. Utilization never falls as bandwidth rises (the schedule is a
max-plus system in the durations), so a bisection over grid indices finds it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from farsync.sim.engine import METHOD_LABELS, METHODS, SimConfig, method_config, simulate, with_bandwidth
from farsync.sim.model import ModelSpec, SimInputError

TARGETS: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95, 0.99)

PAPER_GRID: np.ndarray = np.geomspace(0.1, 1000.0, 50)
#: Four times finer than the paper's grid (ratio 10^(1/49) ≈ 1.048), over a wider range;
#: every paper grid point is also a fine grid point.
FINE_GRID: np.ndarray = np.geomspace(0.01, 1e5, 7 * 49 + 1)
GRIDS: dict[str, np.ndarray] = {"paper": PAPER_GRID, "fine": FINE_GRID}
#: grid="exact": bisection on a continuous bandwidth, to this relative precision.
EXACT_RTOL = 1e-4
EXACT_RANGE = (1e-4, 1e7)

#: The issue's (paper's) 1B row of Table 4, Gbit/s.
PAPER_TABLE4_1B: dict[str, dict[float, float]] = {
    "dp": {0.5: 86.8, 0.8: 152.6, 0.9: 184.2, 0.95: 222.3, 0.99: 569.0},
    "diloco": {0.5: 1.4, 0.8: 6.2, 0.9: 13.3, 0.95: 23.3, 0.99: 86.8},
    "streaming": {0.5: 1.4, 0.8: 5.2, 0.9: 9.1, 0.95: 16.0, 0.99: 28.1},
    "streaming-overlap": {0.5: 1.4, 0.8: 4.3, 0.9: 6.2, 0.95: 9.1, 0.99: 11.0},
    "streaming-overlap-fp4": {0.5: 0.4, 0.8: 0.9, 0.9: 1.7, 0.95: 2.0, 0.99: 3.0},
}


def grid_values(grid: str) -> np.ndarray:
    """Bandwidths (Gbit/s) of a named grid ('paper' or 'fine')."""
    try:
        return GRIDS[grid]
    except KeyError:
        raise SimInputError(
            "grid", grid, f"choose from {', '.join([*GRIDS, 'exact'])}"
        ) from None


def grid_index(value: float, grid: str = "paper") -> int:
    """Index of the grid point nearest to `value` in log distance."""
    g = grid_values(grid)
    return int(np.argmin(np.abs(np.log(g) - math.log(value))))


def utilization(config: SimConfig) -> float:
    """Compute utilization (0…1] of `config` in steady state."""
    return simulate(config).utilization


def utilization_curve(config: SimConfig, bandwidths_gbps: Iterable[float]) -> list[float]:
    """Utilization at each bandwidth, everything else as in `config`."""
    return [utilization(with_bandwidth(config, float(b))) for b in bandwidths_gbps]


def required_bandwidth(config: SimConfig, target: float, grid: str = "paper") -> float | None:
    """Smallest bandwidth (Gbit/s) at which `config` reaches utilization `target`.

    grid: 'paper' / 'fine' pick the smallest point of that grid (None if the largest is not
    enough); 'exact' bisects a continuous bandwidth to relative precision 1e-4 (None above
    10^7 Gbit/s, e.g. when latency alone caps utilization below the target).
    """
    if not (0 < target <= 1):
        raise SimInputError("target", target, "must be a utilization in (0, 1]")
    ok = lambda b: utilization(with_bandwidth(config, float(b))) >= target - 1e-12  # noqa: E731
    if grid == "exact":
        lo, hi = EXACT_RANGE
        if not ok(hi):
            return None
        if ok(lo):
            return lo
        while hi / lo > 1 + EXACT_RTOL:
            mid = math.sqrt(lo * hi)
            lo, hi = (lo, mid) if ok(mid) else (mid, hi)
        return hi
    g = grid_values(grid)
    if not ok(g[-1]):
        return None
    lo, hi = -1, len(g) - 1  # invariant: g[hi] reaches the target, g[lo] does not (or lo = -1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(g[mid]):
            hi = mid
        else:
            lo = mid
    return float(g[hi])


def required_table(
    model: ModelSpec,
    methods: Sequence[str] = tuple(METHODS),
    targets: Sequence[float] = TARGETS,
    grid: str = "paper",
    **overrides,
) -> dict[str, dict[float, float | None]]:
    """Table 4 for one model: method -> target -> required bandwidth (Gbit/s or None).
    `overrides` go to `method_config` (codec, workers, latency_s, …)."""
    return {
        m: {t: required_bandwidth(method_config(model, m, **overrides), t, grid) for t in targets}
        for m in methods
    }


def grid_step_errors(
    table: dict[str, dict[float, float | None]],
    reference: dict[str, dict[float, float]] = PAPER_TABLE4_1B,
    grid: str = "paper",
) -> dict[str, dict[float, int | None]]:
    """Per cell: (index of ours) - (index of the reference) on `grid`; + means we need more
    bandwidth than the paper. None where ours is off the grid."""
    return {
        m: {
            t: (None if table[m].get(t) is None else grid_index(table[m][t], grid) - grid_index(v, grid))
            for t, v in row.items()
        }
        for m, row in reference.items()
        if m in table
    }


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def markdown_table(
    table: dict[str, dict[float, float | None]],
    reference: dict[str, dict[float, float]] | None = None,
    grid: str = "paper",
) -> str:
    """Markdown like the paper's Table 4. With `reference`, each cell reads
    'ours / paper (Δ grid steps)'."""
    targets = list(next(iter(table.values())).keys())
    head = "| method | " + " | ".join(f"{t:.0%}" for t in targets) + " |"
    lines = [head, "|---|" + "---|" * len(targets)]
    errs = grid_step_errors(table, reference, grid) if reference else None
    for m, row in table.items():
        cells = []
        for t in targets:
            cell = _fmt(row[t])
            if reference and m in reference and t in reference[m]:
                d = errs[m][t]
                cell += f" / {reference[m][t]:g} ({'off grid' if d is None else f'{d:+d}'})"
            cells.append(cell)
        lines.append(f"| {METHOD_LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def json_table(table: dict[str, dict[float, float | None]]) -> dict[str, dict[str, float | None]]:
    """The table with string target keys ('0.5', …) and values rounded to 0.01 Gbit/s."""
    return {
        m: {f"{t:g}": (None if v is None else round(v, 2)) for t, v in row.items()}
        for m, row in table.items()
    }
