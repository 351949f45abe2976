"""`farsync simulate`: how much compute a link between sites leaves you, per method.

Without --bandwidth: the bandwidth each method needs to reach each target utilization
(Streaming DiLoCo Table 4). With --bandwidth: also the utilization, time per step and
bytes sent at that bandwidth, and with --tokens the wall-clock for a token budget.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Optional

import typer

from farsync.units import format_bytes

# Settings of the library (SimInputError.option) -> the flag a user types.
_FLAGS = {
    "preset": "--preset",
    "layers": "--layers",
    "params": "--params",
    "step_time": "--step-time",
    "mfu": "--mfu",
    "peak_flops": "--peak-tflops",
    "accelerators": "--accelerators",
    "tokens_per_step": "--tokens-per-step",
    "flops_per_step": "--flops-per-step",
    "compute_slowdown": "--compute-slowdown",
    "method": "--method",
    "mode": "--method",
    "codec": "--codec",
    "workers": "--workers",
    "ranks": "--ranks",
    "links": "--links",
    "inner_steps": "--inner-steps",
    "fragments": "--fragments",
    "sync_delay": "--sync-delay",
    "bandwidth_gbps": "--bandwidth",
    "latency_s": "--latency-ms",
    "latency_model": "--latency-model",
    "reductions": "--reductions",
    "fragment_pattern": "--fragment-pattern",
    "exchange": "--exchange",
    "grid": "--grid",
    "target": "--targets",
    "tokens": "--tokens",
}

_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


class _BadOption(Exception):
    def __init__(self, flag: str, value: object, reason: str):
        super().__init__(f"{flag} {value}: {reason}")


def _number(flag: str, text: str) -> float:
    """'1e9', '1.3B', '500M' -> float."""
    s = text.strip().lower()
    mult = 1.0
    if s and s[-1] in _SUFFIX:
        mult, s = _SUFFIX[s[-1]], s[:-1]
    try:
        v = float(s) * mult
    except ValueError:
        raise _BadOption(flag, text, "not a number (e.g. 1e9 or 1.3B)") from None
    if not math.isfinite(v):
        raise _BadOption(flag, text, "must be finite")
    return v


def _split(values: Optional[list[str]]) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out.extend(x.strip() for x in v.split(",") if x.strip())
    return out



def _fmt_duration(s: float) -> str:
    if s < 120:
        return f"{s:.3g} s"
    if s < 2 * 3600:
        return f"{s / 60:.3g} min"
    if s < 2 * 86400:
        return f"{s / 3600:.3g} h"
    return f"{s / 86400:.3g} days"


@dataclass
class SimulateArgs:
    """The options of `farsync simulate`, as typed (numbers with suffixes still text)."""

    preset: Optional[str] = None
    layers: Optional[int] = None
    params: Optional[str] = None
    step_time: Optional[float] = None
    flops_per_step: Optional[str] = None
    tokens_per_step: Optional[str] = None
    peak_tflops: Optional[float] = None
    mfu: Optional[float] = None
    accelerators: int = 1
    compute_slowdown: float = 1.0
    method: Optional[list[str]] = None
    codec: Optional[str] = None
    workers: int = 2
    ranks: int = 1
    links: str = "shared"
    inner_steps: int = 100
    fragments: Optional[int] = None
    sync_delay: Optional[int] = None
    bandwidth: Optional[float] = None
    latency_ms: float = 0.0
    latency_model: str = "hops"
    reductions: str = "per-layer"
    fragment_pattern: str = "strided"
    exchange: str = "reduce-scatter"
    no_scales: bool = False
    grid: str = "paper"
    targets: str = "0.5,0.8,0.9,0.95,0.99"
    tokens: Optional[str] = None
    as_json: bool = False
    plot: Optional[str] = None


def simulate_command(
    preset: Optional[str] = typer.Option(
        None, "--preset", help="Table 4 model: 1b, 10b or 100b (default 1b unless --layers/--params given)."
    ),
    layers: Optional[int] = typer.Option(None, "--layers", help="Transformer blocks L (custom model or preset override)."),
    params: Optional[str] = typer.Option(None, "--params", help="Parameters N, e.g. 1e9 or 1.3B."),
    step_time: Optional[float] = typer.Option(None, "--step-time", help="Pure-compute seconds per inner step of one worker."),
    flops_per_step: Optional[str] = typer.Option(None, "--flops-per-step", help="FLOPs per inner step per worker (instead of --step-time)."),
    tokens_per_step: Optional[str] = typer.Option(
        None, "--tokens-per-step",
        help="Tokens per inner step per worker: gives FLOPs = 6·N·tokens, and the step count for --tokens.",
    ),
    peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", help="Peak TFLOP/s of one accelerator (with FLOPs)."),
    mfu: Optional[float] = typer.Option(None, "--mfu", help="Model FLOPs utilization in (0, 1] (with FLOPs)."),
    accelerators: int = typer.Option(1, "--accelerators", help="Accelerators per worker (with FLOPs)."),
    compute_slowdown: float = typer.Option(
        1.0, "--compute-slowdown", help="Multiply the step time (= preset's MFU / yours; 2 = half the MFU)."
    ),
    method: Optional[list[str]] = typer.Option(
        None, "--method",
        help="dp, diloco, streaming, streaming-overlap, streaming-overlap-fp4 (repeat or comma-separate; default all).",
    ),
    codec: Optional[str] = typer.Option(
        None, "--codec", help="Wire codec for every method: fp32, bf16, int8, fp4-e3m0, fp4-e2m1 (default: bf16; FP4 method fp4-e3m0)."
    ),
    workers: int = typer.Option(2, "--workers", "-M", help="Workers M joined by the link."),
    ranks: int = typer.Option(
        1, "--ranks", "-R",
        help="Ranks R per worker (a site): each exchange is R shards over R streams at once, 1/R of the bytes each.",
    ),
    links: str = typer.Option(
        "shared", "--links",
        help="shared (the R streams share the site's link of --bandwidth) or per-rank (each rank its own link of --bandwidth).",
    ),
    inner_steps: int = typer.Option(100, "--inner-steps", "-H", help="Inner steps H between syncs."),
    fragments: Optional[int] = typer.Option(None, "--fragments", "-P", help="Fragments P for streaming (default layers/3)."),
    sync_delay: Optional[int] = typer.Option(None, "--sync-delay", help="Sync delay τ of the overlap methods (default 1)."),
    bandwidth: Optional[float] = typer.Option(None, "--bandwidth", help="Link bandwidth in Gbit/s: report utilization there."),
    latency_ms: float = typer.Option(0.0, "--latency-ms", help="One-way latency, ms (per ring hop, or 2x per farsync exchange phase)."),
    latency_model: str = typer.Option(
        "hops", "--latency-model",
        help="hops (a ring collective: each hop pays the latency; the paper's) or phases (farsync's exchange: a round trip per phase).",
    ),
    reductions: str = typer.Option("per-layer", "--reductions", help="When a sync's reductions start: per-layer (paper) or after-backward."),
    fragment_pattern: str = typer.Option("strided", "--fragment-pattern", help="strided (paper) or sequential."),
    exchange: str = typer.Option(
        "reduce-scatter", "--exchange", help="reduce-scatter (ring all-reduce bytes), all-gather, or auto (as farsync train)."),
    no_scales: bool = typer.Option(False, "--no-scales", help="Do not count codec block scales."),
    grid: str = typer.Option("paper", "--grid", help="Bandwidth grid: paper (Table 4's), fine (4x finer) or exact."),
    targets: str = typer.Option("0.5,0.8,0.9,0.95,0.99", "--targets", help="Target utilizations, comma-separated."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="Token budget (all workers) for a wall-clock estimate; needs --bandwidth and --tokens-per-step."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write a utilization-vs-bandwidth plot to this path."),
) -> None:
    """Predict compute utilization of DP, DiLoCo and Streaming DiLoCo over a slow link."""
    args = SimulateArgs(**locals())
    from farsync import sim

    try:
        _run(args)
    except _BadOption as e:
        typer.echo(f"farsync simulate: error: {e}", err=True)
        raise typer.Exit(2) from None
    except sim.SimInputError as e:
        flag = _FLAGS.get(e.option, e.option)
        value = e.value
        if e.option == "latency_s":
            value = args.latency_ms
        elif e.option == "peak_flops":
            value = args.peak_tflops
        typer.echo(f"farsync simulate: error: {flag} {value}: {e.reason}", err=True)
        raise typer.Exit(2) from None


@dataclass
class _Resolved:
    """What the options resolve to: the model, the methods' configs, what to report."""

    model: object  # sim.ModelSpec
    derived: bool  # the model is not a preset as the paper gives it
    configs: dict  # method -> sim.SimConfig
    settings: dict  # SimConfig fields set from the options
    targets: list[float]
    tokens_per_step: Optional[float]
    token_budget: Optional[float]


def _run(a: SimulateArgs) -> None:
    from farsync import sim

    plan = _plan(a)
    table = {m: {t: sim.required_bandwidth(c, t, a.grid) for t in plan.targets} for m, c in plan.configs.items()}
    at_bw = {m: sim.simulate(c) for m, c in plan.configs.items()} if a.bandwidth is not None else None
    if a.plot:
        bws = list(sim.FINE_GRID[(sim.FINE_GRID >= 0.05) & (sim.FINE_GRID <= 2000)])
        from farsync.sim.plot import plot_curves

        plot_curves({plan.model.name: {m: sim.utilization_curve(c, bws) for m, c in plan.configs.items()}}, bws, a.plot)
    if a.as_json:
        typer.echo(json.dumps(_json_report(a, plan, table, at_bw), indent=2))
    else:
        _print_report(a, plan, table, at_bw)


def _model(a: SimulateArgs):
    """The model: a preset (possibly with some fields replaced) or a custom one."""
    from farsync import sim

    custom = any(v is not None for v in (a.layers, a.params, a.step_time, a.flops_per_step, a.mfu, a.peak_tflops))
    n_params = _number("--params", a.params) if a.params is not None else None
    tps = _number("--tokens-per-step", a.tokens_per_step) if a.tokens_per_step is not None else None
    fps = _number("--flops-per-step", a.flops_per_step) if a.flops_per_step is not None else None
    if a.preset is None and not custom:
        a.preset = "1b"
    if a.preset is not None:
        model = sim.preset(a.preset)
        model = replace(
            model,
            layers=a.layers if a.layers is not None else model.layers,
            params=n_params if n_params is not None else model.params,
            step_time=a.step_time if a.step_time is not None else model.step_time,
        )
    else:
        if a.layers is None:
            raise _BadOption("--layers", "(missing)", "a custom model needs --layers (or use --preset)")
        if n_params is None:
            raise _BadOption("--params", "(missing)", "a custom model needs --params (or use --preset)")
        if a.step_time is None and fps is None and tps is None:
            raise _BadOption(
                "--step-time", "(missing)",
                "give --step-time, or --flops-per-step/--tokens-per-step with --peak-tflops and --mfu",
            )
        model = sim.ModelSpec("custom", a.layers, n_params, a.step_time if a.step_time is not None else 1.0)
    if a.step_time is None and (fps is not None or a.mfu is not None or a.peak_tflops is not None):
        if a.peak_tflops is None or a.mfu is None:
            raise _BadOption(
                "--mfu" if a.mfu is None else "--peak-tflops", "(missing)",
                "deriving the step time from FLOPs needs both --peak-tflops and --mfu",
            )
        model = sim.ModelSpec.from_flops(
            model.layers, model.params, peak_flops=a.peak_tflops * 1e12, mfu=a.mfu,
            tokens_per_step=tps, flops_per_step=fps, accelerators=a.accelerators, name=model.name,
        )
    if a.compute_slowdown != 1.0:
        model = model.scaled(a.compute_slowdown)
    return model, custom or a.compute_slowdown != 1.0, tps


def _plan(a: SimulateArgs) -> _Resolved:
    """Check the options that are not SimConfig fields; build one config per method."""
    from farsync import sim

    model, derived, tps = _model(a)
    methods = _split(a.method) or list(sim.METHODS)
    for m in methods:
        if m not in sim.METHODS:
            raise _BadOption("--method", m, f"unknown method (choose from {', '.join(sim.METHODS)})")
    if a.codec is not None and a.codec not in sim.WIRE_FORMATS:
        raise _BadOption("--codec", a.codec, f"unknown codec (choose from {', '.join(sim.WIRE_FORMATS)})")
    if a.sync_delay is not None and not any(sim.METHODS[m]["sync_delay"] for m in methods):
        raise _BadOption("--sync-delay", a.sync_delay, "applies only to streaming-overlap and streaming-overlap-fp4")
    if a.fragments is not None and not any(sim.METHODS[m]["mode"] == "streaming" for m in methods):
        raise _BadOption("--fragments", a.fragments, "applies only to the streaming methods")
    if not (a.latency_ms >= 0 and math.isfinite(a.latency_ms)):
        raise _BadOption("--latency-ms", a.latency_ms, "must be >= 0")
    if a.bandwidth is not None and not (a.bandwidth > 0 and math.isfinite(a.bandwidth)):
        raise _BadOption("--bandwidth", a.bandwidth, "must be a positive number of Gbit/s")
    if a.grid not in (*sim.GRIDS, "exact"):
        raise _BadOption("--grid", a.grid, f"choose from {', '.join([*sim.GRIDS, 'exact'])}")
    try:
        target_list = [float(x) for x in a.targets.split(",") if x.strip()]
    except ValueError:
        raise _BadOption("--targets", a.targets, "comma-separated utilizations, e.g. 0.5,0.9") from None
    if not target_list or any(not (0 < t <= 1) for t in target_list):
        raise _BadOption("--targets", a.targets, "each target must be in (0, 1]")
    token_budget = _number("--tokens", a.tokens) if a.tokens is not None else None
    if token_budget is not None:
        if a.bandwidth is None:
            raise _BadOption("--tokens", a.tokens, "a wall-clock estimate needs --bandwidth")
        if tps is None:
            raise _BadOption("--tokens", a.tokens, "a wall-clock estimate needs --tokens-per-step")
        if not token_budget > 0:
            raise _BadOption("--tokens", a.tokens, "must be positive")
    settings = dict(
        codec=a.codec, workers=a.workers, ranks=a.ranks, links=a.links, inner_steps=a.inner_steps, fragments=a.fragments,
        sync_delay=a.sync_delay, latency_s=a.latency_ms / 1e3, latency_model=a.latency_model, reductions=a.reductions,
        fragment_pattern=a.fragment_pattern, exchange=a.exchange, count_scales=not a.no_scales,
    )
    if a.bandwidth is not None:
        settings["bandwidth_gbps"] = a.bandwidth
    configs = {m: sim.method_config(model, m, **settings) for m in methods}  # validates
    return _Resolved(model, derived, configs, settings, target_list, tps, token_budget)


#: SimConfig fields as `farsync simulate` sets them by default; the JSON report lists
#: the settings that differ.
_DEFAULT_SETTINGS = dict(
    codec=None, workers=2, ranks=1, links="shared", inner_steps=100, fragments=None, sync_delay=None, latency_s=0.0, latency_model="hops",
    reductions="per-layer", fragment_pattern="strided", exchange="reduce-scatter", count_scales=True,
)


def _json_report(a: SimulateArgs, plan: _Resolved, table: dict, at_bw: Optional[dict]) -> dict:
    from farsync import sim

    model = plan.model
    out: dict = {
        "preset": None if a.preset is None else a.preset.lower(),
        "grid": a.grid,
        "required_gbps": sim.json_table(table),
    }
    if a.preset is None or plan.derived:
        out["model"] = {"name": model.name, "layers": model.layers, "params": model.params,
                        "step_time_s": model.step_time}
    changed = {k: v for k, v in plan.settings.items() if k in _DEFAULT_SETTINGS and v != _DEFAULT_SETTINGS[k]}
    if changed:
        out["settings"] = changed
    if at_bw is not None:
        out["at_bandwidth"] = {
            "bandwidth_gbps": a.bandwidth,
            "methods": {
                m: {
                    "utilization": r.utilization,
                    "wall_per_step_s": r.wall_per_step_s,
                    "bytes_per_step_per_worker": r.bytes_per_step,
                    "peak_sync_bytes_per_worker": r.peak_sync_bytes,
                    **({"bytes_per_step_per_stream": r.bytes_per_step / a.ranks} if a.ranks > 1 else {}),
                    **({"wall_clock_s": r.wall_clock_s(plan.token_budget, plan.tokens_per_step)}
                       if plan.token_budget else {}),
                }
                for m, r in at_bw.items()
            },
        }
    return out


def _print_report(a: SimulateArgs, plan: _Resolved, table: dict, at_bw: Optional[dict]) -> None:
    from farsync import sim

    model = plan.model
    typer.echo(
        f"model {model.name}: {model.layers} layers, {model.params:.3g} parameters, "
        f"{model.step_time:.3g} s pure compute per step; M={a.workers}"
        + (f" of R={a.ranks} ranks ({a.links} link{'s' if a.links == 'per-rank' else ''})" if a.ranks > 1 else "")
        + f", H={a.inner_steps}, "
        f"latency {a.latency_ms:g} ms, {a.reductions} reductions"
    )
    typer.echo(f"bandwidth (Gbit/s) needed for each compute utilization, {a.grid} grid (— = beyond the grid):\n")
    typer.echo(sim.markdown_table(table))
    if at_bw is not None:
        typer.echo(f"\nat {a.bandwidth:g} Gbit/s:")
        w = max(len(sim.METHOD_LABELS[m]) for m in at_bw)
        for m, r in at_bw.items():
            line = (f"  {sim.METHOD_LABELS[m]:<{w}}  utilization {r.utilization:6.1%}  "
                    f"{r.wall_per_step_s:.4g} s/step  {format_bytes(r.bytes_per_step)}/step sent per worker"
                    + (f" ({format_bytes(r.bytes_per_step / a.ranks)} per stream)" if a.ranks > 1 else ""))
            if plan.token_budget:
                line += f"  wall-clock {_fmt_duration(r.wall_clock_s(plan.token_budget, plan.tokens_per_step))}"
            typer.echo(line)
    if a.plot:
        typer.echo(f"\nplot: {a.plot}")


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate_command)
