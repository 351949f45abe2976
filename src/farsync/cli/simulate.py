"""`farsync simulate`: how much compute a link between sites leaves you, per method.

Without --bandwidth: the bandwidth each method needs to reach each target utilization
(Streaming DiLoCo Table 4). With --bandwidth: also the utilization, time per step and
bytes sent at that bandwidth, and with --tokens the wall-clock for a token budget.
"""

from __future__ import annotations

import json
import math
from typing import Optional

import typer

from farsync.algorithms.accounting import format_bytes

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
    "algorithm": "--method",
    "codec": "--codec",
    "workers": "--workers",
    "inner_steps": "--inner-steps",
    "fragments": "--fragments",
    "sync_delay": "--tau",
    "bandwidth_gbps": "--bandwidth",
    "latency_s": "--latency-ms",
    "schedule": "--schedule",
    "pattern": "--pattern",
    "collective": "--collective",
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


def simulate(
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
    inner_steps: int = typer.Option(100, "--inner-steps", "-H", help="Inner steps H between syncs."),
    fragments: Optional[int] = typer.Option(None, "--fragments", "-P", help="Fragments P for streaming (default layers/3)."),
    tau: Optional[int] = typer.Option(None, "--tau", help="Sync delay τ of the overlap methods (default 1)."),
    bandwidth: Optional[float] = typer.Option(None, "--bandwidth", help="Link bandwidth in Gbit/s: report utilization there."),
    latency_ms: float = typer.Option(0.0, "--latency-ms", help="One-way latency per collective hop, ms."),
    schedule: str = typer.Option("per-layer", "--schedule", help="per-layer (paper) or after-backward."),
    pattern: str = typer.Option("strided", "--pattern", help="Fragment pattern: strided (paper) or sequential."),
    collective: str = typer.Option("ring", "--collective", help="ring (all-reduce) or all-gather."),
    no_scales: bool = typer.Option(False, "--no-scales", help="Do not count codec block scales."),
    grid: str = typer.Option("paper", "--grid", help="Bandwidth grid: paper (Table 4's), fine (4x finer) or exact."),
    targets: str = typer.Option("0.5,0.8,0.9,0.95,0.99", "--targets", help="Target utilizations, comma-separated."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="Token budget (all workers) for a wall-clock estimate; needs --bandwidth and --tokens-per-step."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write a utilization-vs-bandwidth plot to this path."),
) -> None:
    """Predict compute utilization of DP, DiLoCo and Streaming DiLoCo over a slow link."""
    args = dict(locals())
    from farsync import sim

    try:
        _run(**args)
    except _BadOption as e:
        typer.echo(f"farsync simulate: error: {e}", err=True)
        raise typer.Exit(2) from None
    except sim.SimInputError as e:
        flag = _FLAGS.get(e.option, e.option)
        value = e.value
        if e.option == "latency_s":
            value = latency_ms
        elif e.option == "peak_flops":
            value = peak_tflops
        typer.echo(f"farsync simulate: error: {flag} {value}: {e.reason}", err=True)
        raise typer.Exit(2) from None


def _run(
    preset, layers, params, step_time, flops_per_step, tokens_per_step, peak_tflops, mfu,
    accelerators, compute_slowdown, method, codec, workers, inner_steps, fragments, tau,
    bandwidth, latency_ms, schedule, pattern, collective, no_scales, grid, targets, tokens,
    as_json, plot,
) -> None:
    from dataclasses import replace

    from farsync import sim

    # --- the model -------------------------------------------------------------------
    custom = any(v is not None for v in (layers, params, step_time, flops_per_step, mfu, peak_tflops))
    n_params = _number("--params", params) if params is not None else None
    tps = _number("--tokens-per-step", tokens_per_step) if tokens_per_step is not None else None
    fps = _number("--flops-per-step", flops_per_step) if flops_per_step is not None else None
    if preset is None and not custom:
        preset = "1b"
    if preset is not None:
        model = sim.preset(preset)
        model = replace(
            model,
            layers=layers if layers is not None else model.layers,
            params=n_params if n_params is not None else model.params,
            step_time=step_time if step_time is not None else model.step_time,
        )
    else:
        if layers is None:
            raise _BadOption("--layers", "(missing)", "a custom model needs --layers (or use --preset)")
        if n_params is None:
            raise _BadOption("--params", "(missing)", "a custom model needs --params (or use --preset)")
        if step_time is None and fps is None and tps is None:
            raise _BadOption(
                "--step-time", "(missing)",
                "give --step-time, or --flops-per-step/--tokens-per-step with --peak-tflops and --mfu",
            )
        model = sim.ModelSpec("custom", layers, n_params, step_time if step_time is not None else 1.0)
    if step_time is None and (fps is not None or mfu is not None or peak_tflops is not None):
        if peak_tflops is None or mfu is None:
            raise _BadOption(
                "--mfu" if mfu is None else "--peak-tflops", "(missing)",
                "deriving the step time from FLOPs needs both --peak-tflops and --mfu",
            )
        model = sim.ModelSpec.from_flops(
            model.layers, model.params, peak_flops=peak_tflops * 1e12, mfu=mfu,
            tokens_per_step=tps, flops_per_step=fps, accelerators=accelerators, name=model.name,
        )
    if compute_slowdown != 1.0:
        model = model.scaled(compute_slowdown)
    derived = custom or compute_slowdown != 1.0

    # --- methods and settings ----------------------------------------------------------
    methods = _split(method) or list(sim.METHODS)
    for m in methods:
        if m not in sim.METHODS:
            raise _BadOption("--method", m, f"unknown method (choose from {', '.join(sim.METHODS)})")
    if codec is not None and codec not in sim.WIRE_FORMATS:
        raise _BadOption("--codec", codec, f"unknown codec (choose from {', '.join(sim.WIRE_FORMATS)})")
    if tau is not None and not any(sim.METHODS[m]["sync_delay"] for m in methods):
        raise _BadOption("--tau", tau, "applies only to streaming-overlap and streaming-overlap-fp4")
    if fragments is not None and not any(sim.METHODS[m]["algorithm"] == "streaming" for m in methods):
        raise _BadOption("--fragments", fragments, "applies only to the streaming methods")
    if not (latency_ms >= 0 and math.isfinite(latency_ms)):
        raise _BadOption("--latency-ms", latency_ms, "must be >= 0")
    if bandwidth is not None and not (bandwidth > 0 and math.isfinite(bandwidth)):
        raise _BadOption("--bandwidth", bandwidth, "must be a positive number of Gbit/s")
    if grid not in (*sim.GRIDS, "exact"):
        raise _BadOption("--grid", grid, f"choose from {', '.join([*sim.GRIDS, 'exact'])}")
    try:
        target_list = [float(x) for x in targets.split(",") if x.strip()]
    except ValueError:
        raise _BadOption("--targets", targets, "comma-separated utilizations, e.g. 0.5,0.9") from None
    if not target_list or any(not (0 < t <= 1) for t in target_list):
        raise _BadOption("--targets", targets, "each target must be in (0, 1]")
    token_budget = _number("--tokens", tokens) if tokens is not None else None
    if token_budget is not None:
        if bandwidth is None:
            raise _BadOption("--tokens", tokens, "a wall-clock estimate needs --bandwidth")
        if tps is None:
            raise _BadOption("--tokens", tokens, "a wall-clock estimate needs --tokens-per-step")
        if not token_budget > 0:
            raise _BadOption("--tokens", tokens, "must be positive")

    settings = dict(
        codec=codec, workers=workers, inner_steps=inner_steps, fragments=fragments,
        sync_delay=tau, latency_s=latency_ms / 1e3, schedule=schedule, pattern=pattern,
        collective=collective, count_scales=not no_scales,
    )
    if bandwidth is not None:
        settings["bandwidth_gbps"] = bandwidth
    configs = {m: sim.method_config(model, m, **settings) for m in methods}  # validates

    table = {m: {t: sim.required_bandwidth(c, t, grid) for t in target_list} for m, c in configs.items()}
    at_bw = {m: sim.simulate(c) for m, c in configs.items()} if bandwidth is not None else None

    if plot:
        bws = list(sim.FINE_GRID[(sim.FINE_GRID >= 0.05) & (sim.FINE_GRID <= 2000)])
        from farsync.sim.plot import plot_curves

        plot_curves({model.name: {m: sim.utilization_curve(c, bws) for m, c in configs.items()}}, bws, plot)

    defaults = dict(
        codec=None, workers=2, inner_steps=100, fragments=None, sync_delay=None, latency_s=0.0,
        schedule="per-layer", pattern="strided", collective="ring", count_scales=True,
    )
    changed = {k: v for k, v in settings.items() if k in defaults and v != defaults[k]}

    if as_json:
        out: dict = {
            "preset": None if preset is None else preset.lower(),
            "grid": grid,
            "required_gbps": sim.json_table(table),
        }
        if preset is None or derived:
            out["model"] = {"name": model.name, "layers": model.layers, "params": model.params,
                            "step_time_s": model.step_time}
        if changed:
            out["settings"] = changed
        if at_bw is not None:
            out["at_bandwidth"] = {
                "bandwidth_gbps": bandwidth,
                "methods": {
                    m: {
                        "utilization": r.utilization,
                        "wall_per_step_s": r.wall_per_step_s,
                        "bytes_per_step_per_worker": r.bytes_per_step,
                        "peak_sync_bytes_per_worker": r.peak_sync_bytes,
                        **({"wall_clock_s": r.wall_clock_s(token_budget, tps)} if token_budget else {}),
                    }
                    for m, r in at_bw.items()
                },
            }
        typer.echo(json.dumps(out, indent=2))
        return

    typer.echo(
        f"model {model.name}: {model.layers} layers, {model.params:.3g} parameters, "
        f"{model.step_time:.3g} s pure compute per step; M={workers}, H={inner_steps}, "
        f"latency {latency_ms:g} ms, {schedule} reductions"
    )
    typer.echo(f"bandwidth (Gbit/s) needed for each compute utilization, {grid} grid (— = beyond the grid):\n")
    typer.echo(sim.markdown_table(table))
    if at_bw is not None:
        typer.echo(f"\nat {bandwidth:g} Gbit/s:")
        w = max(len(sim.METHOD_LABELS[m]) for m in at_bw)
        for m, r in at_bw.items():
            line = (f"  {sim.METHOD_LABELS[m]:<{w}}  utilization {r.utilization:6.1%}  "
                    f"{r.wall_per_step_s:.4g} s/step  {format_bytes(r.bytes_per_step)}/step sent per worker")
            if token_budget:
                line += f"  wall-clock {_fmt_duration(r.wall_clock_s(token_budget, tps))}"
            typer.echo(line)
    if plot:
        typer.echo(f"\nplot: {plot}")


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate)
