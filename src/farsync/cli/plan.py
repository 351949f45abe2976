"""`farsync plan [RECIPE] [--section.key=value ...]`: measure the link, choose H, P, τ and
the codec, print the choice; no training."""

from __future__ import annotations

import json

import typer

from farsync.cli.common import echo_main, fail, user_errors
from farsync.overrides import split_args

HELP = """Measure the link between the workers and choose H, P, τ and the codec for it.

Launch it as you launch training (under torchrun: one process per worker): every worker
measures bandwidth and round trip over the process group, and its step time on the
recipe's model; the simulator then picks, inside the plan.* bounds, the setting that sends
the fewest bytes among those predicted to reach plan.target_utilization. Prints the choice,
the alternatives and why they lost, and writes RUN_DIR/NAME/plan.json. In one process there
is no link to measure: give it as --plan.bandwidth_mbit=MBIT --plan.rtt_ms=MS.
`farsync train --algo.auto=true` does the same, then trains with the choice.
"""


def plan(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print plan.json instead of the summary."),
) -> None:
    from farsync.train.config import build_config, load_recipe

    positional, overrides = split_args(list(ctx.args))
    if len(positional) > 1:
        raise fail(f"at most one recipe file (got {positional}); overrides look like --section.key=value")
    cfg = user_errors(lambda: build_config(load_recipe(positional[0]) if positional else None,
                                           [*overrides, "--algo.auto=true"]))
    from farsync.plan.run import plan_only

    doc, path = user_errors(lambda: plan_only(cfg))
    if as_json:
        echo_main(json.dumps(doc, indent=2))
    else:
        c = doc["chosen"]
        echo_main(f"--algo.mode={c['mode']} --algo.inner_steps={c['inner_steps']} --algo.fragments={c['fragments']} "
                  f"--algo.sync_delay={c['sync_delay']} --algo.codec={c['codec']}")
        echo_main(f"predicted utilization {doc['predicted_utilization']:.1%} (target {doc['target_utilization']:.0%}); "
                  f"plan: {path}")


def register(app: typer.Typer) -> None:
    app.command(
        "plan", help=HELP,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(plan)
