"""Utilization-vs-bandwidth plots (matplotlib, imported lazily; Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from farsync.sim.engine import METHOD_LABELS


def plot_curves(
    panels: Mapping[str, Mapping[str, Sequence[float]]],
    bandwidths_gbps: Sequence[float],
    path: str,
    targets: Sequence[float] = (0.5, 0.8, 0.9, 0.95, 0.99),
    title: str = "Simulated compute utilization (Streaming DiLoCo §3.1 DAG)",
) -> None:
    """One panel per entry of `panels` (panel title -> method -> utilization per
    bandwidth), log-x bandwidth axis, one line per method, dotted lines at `targets`.
    Writes a PNG (or whatever the suffix of `path` says)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.2), squeeze=False, sharey=True)
    for ax, (name, curves) in zip(axes[0], panels.items()):
        for method, util in curves.items():
            ax.plot(bandwidths_gbps, [100 * u for u in util], label=METHOD_LABELS.get(method, method))
        for t in targets:
            ax.axhline(100 * t, color="grey", lw=0.5, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("bandwidth between workers (Gbit/s)")
        ax.set_title(name)
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel("compute utilization (%)")
    axes[0][0].set_ylim(0, 101)
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
