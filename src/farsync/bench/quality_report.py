"""quality.md and the plots of the quality benchmark, drawn from its report dict alone
(what quality.json holds; see :func:`farsync.bench.quality.build_report`)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from farsync.algorithms.accounting import dp_bytes_per_step  # noqa: E402
from farsync.units import format_bytes  # noqa: E402

METHOD_LABELS = {
    "dp": "Data-parallel",
    "diloco": "DiLoCo",
    "streaming": "Streaming DiLoCo (τ=0)",
    "streaming-overlap": "Streaming + overlap",
}


FAMILY_LABELS = {"sparseloco": "SparseLoCo: EF β {b:g}, no outer momentum",
                 "ef-nesterov": "EF β {b:g} + Nesterov"}


def row_label(r: dict) -> str:
    s = METHOD_LABELS[r["method"]] + f", M = {r['workers']}"
    if r["method"] == "streaming-overlap":
        s += (f" (α {r['mixing']:g})" if r.get("mixing") is not None else "") + f" + {r['codec']}"
    if r.get("family"):
        s += " (" + FAMILY_LABELS[r["family"]].format(b=r["error_feedback_decay"]) + ")"
    if r.get("variant"):
        s += f" + {r['variant']}"
    return s


def _hp(h: dict) -> str:
    if h.get("outer_lr") is None:
        return f"lr {h['lr']:g}"
    return f"inner lr {h['lr']:g}, outer lr {h['outer_lr']:g}, momentum {h['outer_momentum']:g}, H {h['inner_steps']}"


def _pct(v) -> str:
    return "—" if v is None else f"{v:+.2f} %"


def gap_markdown(report: dict) -> str:
    lines = [
        "| method | hyperparameters | seeds | eval loss | gap to DP at the same M (per-seed range) | gap to DP at "
        "M = 1 | scaling-law prediction at this size | paper, 35M | DP bytes ÷ method's | peak bytes / sync |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["gap_table"]:
        gap = "—" if r["method"] == "dp" else (
            f"{r['gap_pct']:+.2f} %" + (f" ({min(r['gap_pct_by_seed']):+.2f} … {max(r['gap_pct_by_seed']):+.2f})"
                                        if len(r["seeds"]) > 1 else ""))
        ratio = "—" if r["bytes_ratio"] is None else f"{r['bytes_ratio']:,.0f}×"
        peak = "—" if r["workers"] == 1 else format_bytes(r["peak_bytes_per_sync"])  # M = 1 sends nothing
        lines.append(
            f"| {row_label(r)} | {_hp(r['hparams'])} | {len(r['seeds'])} | {r['eval_loss']:.4f} | {gap} "
            f"| {'—' if r['method'] == 'dp' and r['workers'] == 1 else _pct(r['gap_pct_vs_dp_m1'])} "
            f"| {_pct(r['scaling_law_gap_pct'])} | {_pct(r['paper_35m_gap_pct'])} | {ratio} | {peak} |")
    return "\n".join(lines)


def tuning_markdown(report: dict) -> str:
    t = report["tuning"]
    lines = ["| family | M | point | final eval loss |", "|---|---|---|---|"]
    sweeps = [("Data-parallel (lr)", t["dp"]), ("DiLoCo (inner lr, outer lr, momentum, H)", t["diloco"])]
    sweeps += [("DiLoCo (outer lr)", s) for s in t["diloco_outer_lr_by_workers"].values()]
    sweeps += [(f"Streaming + overlap + {report['spec']['headline_codec']} (α)", t["streaming_mixing"])]
    spec = report["spec"]
    if "sparse_sparseloco" in t:
        sweeps += [(f"SparseLoCo + {spec['sparse_headline']} (outer lr; EF β {spec['sparse_decay']:g})",
                    t["sparse_sparseloco"]),
                   (f"EF + Nesterov + {spec['sparse_headline']} (EF β)", t["sparse_ef-nesterov"])]
    for name, s in sweeps:
        best = s["best"]["run"]
        for g in s["grid"]:
            mark = " **best**" if g["run"] == best else ""
            point = _hp(g["hparams"]) + (f", α {g['mixing']:g}" if g.get("mixing") is not None else "") + (
                f", EF β {g['error_feedback_decay']:g}" if g.get("error_feedback_decay") is not None else "")
            lines.append(f"| {name} | {g['workers'] if g['hparams'].get('outer_lr') is not None else 'any'} "
                         f"| {point} | {g['final_eval_loss']:.4f}{mark} |")
    return "\n".join(lines)


def targets_markdown(report: dict) -> str:
    lines = ["| target | measured | met |", "|---|---|---|"]
    for key, t in report["targets"].items():
        v = t["value"]
        if key == "runtime":
            shown = f"{v / 60:.1f} min" + (" (estimated: runs reused)" if t.get("estimated") else "")
        elif key == "headline_100x_fewer_bytes":
            shown = f"{v:,.0f}× fewer" if v else "—"
        elif key == "headline_within_1pt_of_diloco":
            shown = f"{v:+.2f} points"
        elif key.startswith(("sparse", "stretch_sparse")):
            shown = "no row reaches that ratio" if v is None else f"{v:+.2f} % at {t['bytes_ratio']:,.0f}×"
        else:
            shown = f"{v:+.2f} %"
        lines.append(f"| {t['what']} | {shown} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines)


def _point_label(p: dict) -> str:
    s = METHOD_LABELS[p["method"]] + ("" if p["method"] == "diloco" else f" + {p['codec']}")
    if p.get("family"):
        s += " (" + FAMILY_LABELS[p["family"]].format(b=p["error_feedback_decay"]) + ")"
    if p.get("variant"):
        s += f" + {p['variant']}"
    return s + f", H {p['inner_steps']}"


def frontier_markdown(report: dict) -> str:
    lines = ["| M | method | DP bytes ÷ method's | gap to DP (same M) | seeds |", "|---|---|---|---|---|"]
    for M, points in report.get("frontier", {}).items():
        for p in sorted(points, key=lambda p: p["bytes_ratio"]):
            lines.append(f"| {M} | {_point_label(p)} | {p['bytes_ratio']:,.0f}× | {p['gap_pct']:+.2f} % | "
                         f"{len(p['seeds'])} |")
    return "\n".join(lines)


def write_markdown(report: dict, path: str) -> None:
    spec = report["spec"]
    first = report["gap_table"][0]
    o = report["runs"][first["runs"][0]]["optim"]
    parts = [
        "# Quality: DiLoCo and Streaming DiLoCo vs data-parallel, in the papers' regime",
        "",
        f"Generated by `{report['command']}` on {report['date']} in {report['runtime_seconds'] / 60:.1f} min "
        f"({report['machine']['cpus']} CPUs, torch {report['machine']['torch']}).",
    ]
    if report["reused_runs"]:
        parts += ["", f"{len(report['reused_runs'])} of {len(report['runs'])} runs were read back from an earlier "
                      f"invocation (`--reuse`: same resolved config); training every run from scratch, two at a "
                      f"time, takes about {report['targets']['runtime']['value'] / 60:.0f} min."]
    if report["quick"]:
        parts += ["", "**`--quick` run: a test of the harness; its figures mean nothing.**"]
    parts += [
        "",
        f"Setup: model `{spec['size']}` ({first['parameters']:,} parameters), vocabulary {spec['vocab_size']}, "
        f"sequence length {spec['seq_len']}; {first['tokens']:,} tokens per run "
        f"({first['tokens'] / first['parameters']:.1f} per parameter) in {report['steps']} steps of a global batch "
        f"of {spec['global_batch']} sequences, split evenly over the M workers; each gap is against DP at "
        f"the same M (the same batches; lr tuned at M = 1), the gap to DP at M = 1 beside it. Inner AdamW (β {o['beta1']:g}/{o['beta2']:g}, weight decay {o['weight_decay']:g}, "
        f"warmup {o['warmup_steps']}, cosine to {100 * o['min_lr_ratio']:g} %, clip {o['grad_clip']:g}); "
        f"inner weight decay divided by the outer gain outer lr ÷ (1 − momentum) for DiLoCo/Streaming (the trainer's default); outer Nesterov SGD. Streaming: P = {spec['fragments']} strided "
        f"fragments, overlap τ = {spec['overlap_delay']} with α tuned over "
        f"{', '.join(f'{a:g}' for a in spec['overlap_mixings'])}. Eval loss on the same {spec['eval_sequences']} "
        f"held-out sequences for every run. Gaps are per seed, then averaged.",
        "",
        "## Gap to data-parallel",
        "",
        gap_markdown(report),
        "",
        "The prediction column is Scaling Laws for DiLoCo (arXiv 2503.09799) Table 7's power laws evaluated "
        "at this model's parameter count (no fit is given for M = 1); the 35M column is its Table 4.",
        "",
        "## Tuning (equal budgets)",
        "",
        tuning_markdown(report),
        "",
        "## The frontier: loss gap to DP against DP's bytes ÷ the method's",
        "",
        frontier_markdown(report),
        "",
        "## Targets",
        "",
        targets_markdown(report),
        "",
        "Plots: `quality_sweeps.png` (loss vs H, outer lr, outer momentum and inner lr), `quality_loss_vs_tokens.png`, "
        "`quality_loss_vs_bytes.png`, `quality_frontier.png` (gap to DP vs DP bytes ÷ method's, every M).",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(parts))


_COLORS = ["black", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
           "tab:gray", "tab:olive", "tab:cyan"]


def _zoom(ax, ys: list[float]) -> None:
    """Leave out the first evaluations' much higher losses so the methods' differences show."""
    if ys:
        lo, hi = min(ys), max(ys)
        pad = 0.05 * (hi - lo or 1.0)
        ax.set_ylim(lo - pad, hi + pad)


def _curve_plot(report: dict, kind: str, path: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    late = []
    M = report["spec"]["tune_workers"]
    for color, r in zip(_COLORS, report["gap_table"]):
        curve = report["runs"][r["runs"][0]]["curve"]
        label = row_label(r)
        if kind == "bytes" and r["method"] == "dp":
            # DP at M = 1 sends nothing; plot what M workers would send for the same steps
            per_step = M * dp_bytes_per_step(M, r["parameters"])
            curve = [{**p, "bytes_sent_total": p["step"] * per_step} for p in curve]
            label += f" (bytes of M = {M})"
        if kind == "bytes":
            curve = [p for p in curve if p["bytes_sent_total"] > 0]
        if not curve:
            continue
        x = [p["tokens"] if kind == "tokens" else p["bytes_sent_total"] for p in curve]
        y = [p["eval_loss"] for p in curve]
        ax.plot(x, y, marker="o", ms=3, lw=1.2, color=color, label=label)
        late += y[len(y) // 3:]
    _zoom(ax, late)
    if kind == "bytes":
        ax.set_xscale("log")
        ax.set_xlabel("bytes sent by all workers so far (log)")
    else:
        ax.set_xlabel("tokens (all workers)")
    ax.set_ylabel("eval loss (nats/token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(f"quality benchmark: eval loss vs {kind} (seed 0, {report['spec']['size']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _slice(grid: list[dict], centre: dict, axis: str) -> list[tuple[float, float]]:
    """The grid points that differ from ``centre`` only along ``axis``."""
    others = [k for k in ("lr", "outer_lr", "outer_momentum", "inner_steps") if k != axis]
    pts = [(g["hparams"][axis], g["final_eval_loss"]) for g in grid
           if all(g["hparams"][k] == centre[k] for k in others)]
    return sorted(pts)


def write_plots(report: dict, out_dir: str) -> list[str]:
    """quality_sweeps.png, quality_loss_vs_tokens.png, quality_loss_vs_bytes.png."""
    t = report["tuning"]
    dp_loss = t["dp"]["best"]["final_eval_loss"]
    M0 = report["spec"]["tune_workers"]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    d = t["diloco"]
    for ax, axis, xlabel in zip(axes, ("inner_steps", "outer_lr", "outer_momentum", "lr"),
                                ("H (inner steps per round)", "outer lr", "outer Nesterov momentum", "inner lr")):
        pts = _slice(d["grid"], d["grid"][0]["hparams"], axis)  # the grid's first point is its centre
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:blue", label=f"DiLoCo, M = {M0}")
        if axis == "outer_lr":
            for color, (M, s) in zip(_COLORS[2:], t["diloco_outer_lr_by_workers"].items()):
                pts = sorted((g["hparams"]["outer_lr"], g["final_eval_loss"]) for g in s["grid"])
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "s--", color=color, label=f"DiLoCo, M = {M}")
        if axis == "lr":
            pts = sorted((g["hparams"]["lr"], g["final_eval_loss"]) for g in t["dp"]["grid"])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "s-", color="black", label="Data-parallel (its lr)")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on a short decade
        ax.axhline(dp_loss, color="black", ls=":", lw=1, label="best DP")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("final eval loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"quality benchmark: final loss along each axis of the M = {M0} grid, through its centre "
                 f"(other M: outer lr at the tuned inner lr, momentum and H)")
    fig.tight_layout()
    paths = [os.path.join(out_dir, "quality_sweeps.png")]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    for kind in ("tokens", "bytes"):
        paths.append(os.path.join(out_dir, f"quality_loss_vs_{kind}.png"))
        _curve_plot(report, kind, paths[-1])
    paths.append(os.path.join(out_dir, "quality_frontier.png"))
    _frontier_plot(report, paths[-1])
    return paths


_MARKERS = {"diloco": "s", "streaming": "^", "streaming-overlap": "o"}


def _frontier_plot(report: dict, path: str) -> None:
    """Gap to DP against DP's bytes ÷ the method's, one panel per M; sparse families in
    colour, dense codecs in grey, the headline and its +1 point line marked."""
    frontier = report.get("frontier", {})
    fig, axes = plt.subplots(1, max(1, len(frontier)), figsize=(7 * max(1, len(frontier)), 5), squeeze=False)
    colours = {None: "tab:gray", "sparseloco": "tab:red", "ef-nesterov": "tab:blue"}
    spec = report["spec"]
    for ax, (M, points) in zip(axes[0], frontier.items()):
        for fam in (None, "sparseloco", "ef-nesterov"):
            pts = sorted((p for p in points if p["family"] == fam), key=lambda p: p["bytes_ratio"])
            for p in pts:
                ax.scatter(p["bytes_ratio"], p["gap_pct"], marker=_MARKERS[p["method"]], color=colours[fam],
                           s=40 if len(p["seeds"]) == 1 else 90, zorder=3)
                ax.annotate(_point_label(p).replace("Streaming + overlap + ", ""), (p["bytes_ratio"], p["gap_pct"]),
                            fontsize=6, xytext=(3, 3), textcoords="offset points")
        head = [p for p in points if p["method"] == "streaming-overlap" and p["codec"] == spec["headline_codec"]
                and p["family"] is None and not p["variant"]]
        if head:
            ax.axhline(head[0]["gap_pct"] + 1.0, color="tab:gray", ls=":", lw=1,
                       label=f"{spec['headline_codec']} headline + 1 point")
        ax.axvline(spec["frontier_bytes_target"], color="tab:green", ls="--", lw=1,
                   label=f"{spec['frontier_bytes_target']:g}× fewer bytes")
        ax.set_xscale("log")
        ax.set_xlabel("DP bytes ÷ method's bytes (per worker, log)")
        ax.set_ylabel("gap to DP at the same M (%)")
        ax.set_title(f"M = {M} (grey: dense codecs; red: SparseLoCo; blue: EF + Nesterov; big: 2 seeds)", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"quality benchmark: the frontier ({spec['size']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
