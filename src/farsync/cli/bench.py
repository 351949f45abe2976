"""`farsync bench quality`: DP vs DiLoCo vs Streaming DiLoCo, same model, data, tokens
and seed — final loss against bytes sent. The harness is :mod:`farsync.bench.quality`."""

from __future__ import annotations

import shlex
from typing import Optional

import typer

from farsync.cli.common import fail, user_errors

bench_app = typer.Typer(
    name="bench",
    help="Benchmarks that train real models and write results under benchmarks/results.",
    no_args_is_help=True,
    add_completion=False,
)

# rich help keeps single newlines, so each paragraph is one string
QUALITY_HELP = "\n\n".join([
    "Data-parallel vs DiLoCo vs Streaming DiLoCo at equal tokens: loss against bytes sent.",
    "Trains the same model on the same data, token budget and seed with data-parallel, DiLoCo, "
    "Streaming DiLoCo (τ = 0), and Streaming + overlap (τ = 1) with fp32, fp4-e3m0, fp4-e2m1 and int8 "
    "pseudo-gradients, for M = 4 and M = 2 workers; tunes DP's lr and DiLoCo's/Streaming's outer lr × H "
    "with equal budgets; compares three model sizes. Writes quality.json, quality.md and plots to --out.",
    "The full run takes about 25 minutes on 2 CPU cores; --quick (nano model, 30 steps) a minute or "
    "two and only tests the harness.",
])


def quality(
    quick: bool = typer.Option(False, "--quick", help="Tiny version: nano model, 30 steps (tests the harness)."),
    out: Optional[str] = typer.Option(
        None, "--out", help="Results folder (default benchmarks/results; with --quick benchmarks/out/quality-quick)."),
    work_dir: Optional[str] = typer.Option(
        None, "--work-dir", help="Run directories (default benchmarks/out/quality[-quick])."),
    workers: Optional[str] = typer.Option(
        None, "--workers", help="M of each table, comma-separated; the first is the default table (4,2)."),
    jobs: int = typer.Option(2, "--jobs", help="Runs trained at once, one torch thread each."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Inner steps per run (default 160; quick 30)."),
    size: Optional[str] = typer.Option(None, "--size", help="Model size of the tables (default tiny; quick nano)."),
    sizes: Optional[str] = typer.Option(
        None, "--sizes", help="Sizes of the size study, comma-separated (default nano,tiny,mini)."),
) -> None:
    from farsync.bench.quality import FULL, QUICK, run_benchmark, spec_with

    if jobs < 1:
        raise fail(f"--jobs must be >= 1 (got {jobs})")
    if steps is not None and steps < 1:
        raise fail(f"--steps must be >= 1 (got {steps})")

    def ints(flag: str, text: str) -> tuple[int, ...]:
        try:
            return tuple(int(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"{flag} takes comma-separated integers such as 4,2 (got {text!r})") from None

    def build():
        base = QUICK if quick else FULL
        spec = spec_with(
            base, steps=steps, size=size,
            workers=ints("--workers", workers) if workers else None,
            sizes=tuple(s.strip() for s in sizes.split(",") if s.strip()) if sizes else None,
        )
        if size and not sizes and size not in spec.sizes:
            spec = spec_with(spec, sizes=tuple(sorted({*spec.sizes, size})))
        spec.validate()
        return spec

    spec = user_errors(build)
    suffix = "-quick" if quick else ""
    out_dir = out or ("benchmarks/out/quality-quick" if quick else "benchmarks/results")
    given = [("--quick", quick or None), ("--out", out), ("--work-dir", work_dir), ("--workers", workers),
             ("--jobs", jobs if jobs != 2 else None), ("--steps", steps), ("--size", size), ("--sizes", sizes)]
    command = " ".join(["farsync bench quality"] + [
        flag if value is True else f"{flag} {shlex.quote(str(value))}" for flag, value in given if value is not None])
    user_errors(lambda: run_benchmark(spec, out_dir, work_dir or f"benchmarks/out/quality{suffix}", jobs=jobs,
                                      quick=quick, command=command))


def register(app: typer.Typer) -> None:
    bench_app.command("quality", help=QUALITY_HELP)(quality)
    app.add_typer(bench_app, name="bench")
