"""`farsync train [RECIPE.toml] [--section.key=value ...]` and `--resume RUN_DIR`."""

from __future__ import annotations

import os

import typer

from farsync.cli.common import fail, is_main_process, user_errors
from farsync.overrides import split_args

#: the config's sections (farsync.train.config.SECTIONS; listed here so that `--help` does
#: not import the trainer)
SECTION_NAMES = ("model", "data", "algo", "optim", "train", "elastic", "plan", "federated", "site")

HELP = f"""Train a model with DP, DiLoCo or Streaming DiLoCo.

With no recipe: the `micro` model on 20 tokens per parameter of the Python standard
library's source, 4 simulated workers, Streaming DiLoCo with overlap and FP4 exchange in
the regime the quality benchmark validated — about 2 minutes on a laptop CPU. Override
any key as --section.key=value (sections: {', '.join(SECTION_NAMES)}; `farsync train
--keys` lists every key). Under torchrun, each process is one worker.
"""


def train(
    ctx: typer.Context,
    resume: str = typer.Option(None, "--resume", help="Continue the run saved in this run directory."),
    keys: bool = typer.Option(False, "--keys", help="List every config key with its default and help, then exit."),
) -> None:
    from farsync.train.config import AUTO, ConfigError, build_config, field_help, load_recipe, to_dict

    if keys:
        defaults = to_dict(build_config())
        for key, text in field_help().items():
            section, name = key.split(".", 1)
            value = defaults[section][name]
            typer.echo(f"--{key}={AUTO if value is None else value!s:<12}  {text}")
        return
    positional, overrides = split_args(list(ctx.args))
    if len(positional) > 1:
        raise fail(f"at most one recipe file (got {positional}); overrides look like --section.key=value")

    def configure():
        from farsync.train.rundir import check_resume, read_recipe

        if resume:
            path = os.path.join(resume, "config.toml")
            if not os.path.isfile(path):
                raise ConfigError(f"--resume {resume!r}: no config.toml there (not a run directory)")
            if positional:
                raise ConfigError("--resume takes the run's own config; give no recipe")
            saved = build_config(read_recipe(path))
            cfg = build_config(read_recipe(path), overrides)
            check_resume(saved, cfg, resume)  # before anything is written
            return cfg
        return build_config(read_recipe(positional[0]) if positional else None, overrides)

    cfg = user_errors(configure)
    from farsync.train import train as run_training

    from farsync.comm.elastic import ElasticError
    from farsync.comm.rendezvous import WorkerLost
    from farsync.train.launch import LaunchError

    try:
        summary = user_errors(lambda: run_training(cfg, run_dir=resume, resume=bool(resume), refuse_existing=True,
                                                  fork_workers=True))
    except (ElasticError, WorkerLost, LaunchError) as e:  # a run this worker cannot go on with: one line, exit code 1
        if os.environ.get("FARSYNC_DEBUG"):
            raise
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=1) from None
    if "stopped_at" in summary:
        raise typer.Exit(code=130)
    from farsync.train.launch import CHILD_ENV

    speaks = is_main_process() and not os.environ.get(CHILD_ENV)  # a launched worker's parent speaks for it
    if speaks:
        _print_summary(summary)
    if summary.get("failure"):  # trained to the end, but the model is no good: say why, exit code 1
        if speaks:
            typer.echo(f"error: {summary['failure']}", err=True)
        raise typer.Exit(code=1)


def _print_summary(s: dict) -> None:
    from farsync.units import format_bytes

    ratio = f"{s['dp_bytes_ratio']:,.0f}× fewer" if s["dp_bytes_ratio"] else "n/a"
    lines = [
        f"run:                 {s['run_dir']}",
        f"final eval loss:     {s['final_eval_loss']:.4f}",
        f"tokens:              {s['tokens']:,} in {s['wall_seconds']:.1f} s ({s['tokens_per_second']:,.0f} tokens/s)",
        f"bytes sent / worker: {format_bytes(max(s['bytes_sent_per_worker']))} "
        f"(data-parallel: {format_bytes(s['dp_equivalent_bytes_per_worker'])}; {ratio})",
        f"peak bytes / sync:   {format_bytes(s['peak_bytes_per_sync'])}",
        f"compute utilization: {100 * s['compute_utilization']:.1f} %",
    ]
    typer.echo("\n".join(lines))


def register(app: typer.Typer) -> None:
    app.command(
        "train", help=HELP,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(train)
