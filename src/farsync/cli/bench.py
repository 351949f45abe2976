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
    "DiLoCo and Streaming DiLoCo against data-parallel in the papers' regime: 20 tokens per parameter, "
    "a fixed global batch, at least 50 outer rounds per run, every method tuned with the same number of runs.",
    "Tunes DP's lr and DiLoCo's inner lr, outer lr and H at M = 4; runs DiLoCo at M = 1, 2, 4, 8 (outer lr tuned "
    "per M), Streaming DiLoCo (τ = 0, and τ = 1 with fp32, int8 and fp4-e3m0 pseudo-gradients), the options beyond "
    "the papers, and a second seed of the headline rows. Writes quality.json (gap_table: the gap to DP beside the "
    "scaling-law paper's figures), quality.md and plots to --out.",
    "The full run takes under an hour on 2 CPU cores; --quick (nano model, a few steps) a minute or two and only "
    "tests the harness.",
])


def quality(
    quick: bool = typer.Option(False, "--quick", help="Tiny version: nano model, a few steps (tests the harness)."),
    out: Optional[str] = typer.Option(
        None, "--out", help="Results folder (default benchmarks/results; with --quick benchmarks/out/quality-quick)."),
    work_dir: Optional[str] = typer.Option(
        None, "--work-dir", help="Run directories (default benchmarks/out/quality[-quick])."),
    jobs: int = typer.Option(0, "--jobs", help="Runs trained at once, one torch thread each (0: one per core)."),
    reuse: bool = typer.Option(
        False, "--reuse", help="Read back finished runs in --work-dir whose resolved config is unchanged "
                               "instead of training them again (after an interruption, or when the plan grew)."),
    size: Optional[str] = typer.Option(None, "--size", help="Model size (default micro; quick nano)."),
    tokens_per_param: Optional[float] = typer.Option(
        None, "--tokens-per-param", help="Token budget per parameter (default 20)."),
) -> None:
    from farsync.bench.quality import FULL, QUICK, run_benchmark, spec_with

    if jobs < 0:
        raise fail(f"--jobs must be >= 1, or 0 for one per core (got {jobs})")
    from farsync.train.launch import cores

    jobs = jobs or cores()
    if tokens_per_param is not None and not tokens_per_param > 0:
        raise fail(f"--tokens-per-param must be > 0 (got {tokens_per_param})")

    def build():
        spec = spec_with(QUICK if quick else FULL, size=size, tokens_per_param=tokens_per_param)
        spec.validate()
        return spec

    spec = user_errors(build)
    suffix = "-quick" if quick else ""
    out_dir = out or ("benchmarks/out/quality-quick" if quick else "benchmarks/results")
    given = [("--quick", quick or None), ("--out", out), ("--work-dir", work_dir),
             ("--jobs", jobs if jobs != cores() else None), ("--reuse", reuse or None), ("--size", size), ("--tokens-per-param", tokens_per_param)]
    command = " ".join(["farsync bench quality"] + [
        flag if value is True else f"{flag} {shlex.quote(str(value))}" for flag, value in given if value is not None])
    user_errors(lambda: run_benchmark(spec, out_dir, work_dir or f"benchmarks/out/quality{suffix}", jobs=jobs,
                                      quick=quick, command=command, reuse=reuse))


def register(app: typer.Typer) -> None:
    bench_app.command("quality", help=QUALITY_HELP)(quality)
    app.add_typer(bench_app, name="bench")
