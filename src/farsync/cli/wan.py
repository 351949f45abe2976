"""`farsync wan [RECIPE] --workers M [--ranks R] --bandwidth MBIT [--section.key=value ...]` and
`farsync wan --cleanup`."""

from __future__ import annotations

import json

import typer

from farsync.cli.common import fail
from farsync.overrides import split_args

HELP = (
    "Train over real, rate-limited links: one worker process per emulated host.\n\n"
    "Linux, as root. Creates M network namespaces ('hosts', one per worker) on a private bridge (10.77.0.0/24, inside "
    "those namespaces only), limits every host's link in both directions with `tc ... tbf` to --bandwidth "
    "Mbit/s, and runs `farsync train` once per host with torch.distributed over gloo (rendezvous at host "
    "0). Latency is not emulated (no netem here; tbf adds queueing delay only). When the run ends it "
    "prints each host's kernel byte counters beside farsync's own accounting and writes them to "
    "RUN_DIR/NAME/wan.json. Namespaces, links and processes are removed on exit, Ctrl-C, SIGTERM or a "
    "crash; after a SIGKILL a guardian process removes them; `farsync wan --cleanup` removes anything "
    "left by runs that are no longer running.\n\n"
    "Training options are those of `farsync train` (a recipe and --section.key=value); algo.workers is "
    "set to --workers.\n\n"
    "--ranks R runs R processes per host (RANK = host*R + local rank, WORLD_SIZE = hosts*R, as torchrun "
    "--nnodes=M --nproc-per-node=R would): every host is one worker, a site of R ranks (--site.parallel=ddp or "
    "fsdp) sharing the host's link; rank r of every site exchanges shard r over its own stream. The ranks of "
    "a host reach each other over its loopback, never through the rate-limited link."
)


def wan(
    ctx: typer.Context,
    workers: int = typer.Option(2, "--workers", "-M", help="Workers M, one per emulated host."),
    ranks: int = typer.Option(
        1, "--ranks", "-R", help="Worker processes per host: a site of R ranks sharing the host's link (1 = one process).",
    ),
    bandwidth: float = typer.Option(
        None, "--bandwidth", help="Link rate per host and direction, Mbit/s (tbf; 0 = no limit). Required.",
    ),
    mtu: int = typer.Option(1500, "--mtu", help="MTU of the host links, bytes."),
    burst_bytes: int = typer.Option(None, "--burst-bytes", help="tbf bucket, bytes (default: max(2 frames, 1 ms at the rate))."),
    queue_ms: float = typer.Option(2000.0, "--queue-ms", help="tbf queue length as time at the rate, ms."),
    tcp_congestion: str = typer.Option(
        "reno", "--tcp-congestion",
        help="TCP congestion control in the host namespaces ('inherit': the machine's default; see BENCHMARKS.md, WAN).",
    ),
    timeout: float = typer.Option(3600.0, "--timeout", help="Stop the workers after this many seconds."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not echo host 0's training output."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    cleanup: bool = typer.Option(False, "--cleanup", help="Remove namespaces left by killed runs, then exit."),
) -> None:
    from farsync.wan import LinkSpec, WanError, cleanup_stale, preflight

    try:
        if cleanup:
            preflight()
            removed = cleanup_stale()
            typer.echo(f"removed {len(removed)} namespace(s)" + (f": {', '.join(removed)}" if removed else ""))
            return
        positional, overrides = split_args(list(ctx.args))
        if len(positional) > 1:
            raise fail(f"at most one recipe file (got {positional}); overrides look like --section.key=value")
        if bandwidth is None:
            raise fail("--bandwidth is required: the rate of every host's link in Mbit/s (0 = no limit)")
        link = LinkSpec(bandwidth, mtu=mtu, burst_bytes=burst_bytes, queue_ms=queue_ms,
                        congestion_control=None if tcp_congestion == "inherit" else tcp_congestion)
        from farsync.wan.run import Interrupted, run_wan

        try:
            report = run_wan(positional[0] if positional else None, overrides, workers=workers, link=link,
                             timeout_s=timeout, echo=not quiet, ranks=ranks)
        except Interrupted as e:
            typer.echo(f"farsync wan: {e}", err=True)
            raise typer.Exit(code=e.exit_code) from None
        except KeyboardInterrupt:  # Ctrl-C before any namespace existed
            typer.echo("farsync wan: interrupted before the hosts were created; nothing to clean up", err=True)
            raise typer.Exit(code=130) from None
    except (WanError, ValueError) as e:  # ValueError: ConfigError and friends
        raise fail(str(e)) from None
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report))


def _mb(n: float) -> str:
    return f"{n / 1e6:,.3f} MB"


def format_report(r: dict) -> str:
    link, s = r["link"], r["summary"]
    rate = f"{link['bandwidth_mbit']:g} Mbit/s each way (tbf, burst {link['burst_bytes']} B)" \
        if link["bandwidth_mbit"] else "no rate limit"
    lines = [
        f"link: {r['workers']} hosts (one worker each), {rate}, MTU {link['mtu']}, TCP {link.get('congestion_control') or 'inherited'}; "
        "latency not emulated",
        f"{'host':<5}{'address':<12}{'farsync sent':>16}{'kernel tx':>16}{'headers':>14}{'kernel payload':>17}"
        f"{'payload/farsync':>17}{'retrans':>9}",
    ]
    for h in r["per_host"]:
        ratio = "n/a" if h["payload_vs_farsync"] is None else f"{100 * h['payload_vs_farsync']:+.2f} %"
        lines.append(f"{h['host']:<5}{h['address']:<12}{_mb(h['farsync_bytes']):>16}{_mb(h['kernel_tx_bytes']):>16}"
                     f"{_mb(h['header_bytes']):>14}{_mb(h['kernel_payload_bytes']):>17}{ratio:>17}"
                     f"{h['tcp_retrans_segs']:>9}")
    R = r.get("ranks", 1)
    if R > 1:
        lines[0] = lines[0].replace("(one worker each)", f"(one worker each: a site of {R} ranks, {r['parallel']})")
        lines.append(f"farsync sent = cross-site bytes of the site's {R} streams; inside each site (loopback, not "
                     "on the link):")
        for h in r["per_host"]:
            lines.append(f"  host {h['host']}: {_mb(h['farsync_bytes_per_stream'])} per stream; farsync site bytes "
                         f"{_mb(h['site_bytes'])}, kernel lo {_mb(h['kernel_lo_bytes'])}; route to its own address: "
                         f"{h['own_address_route']}")
    lines.append(
        f"mode {s['mode']} ({s['codec']}), {s['steps']} steps: wall {s['wall_seconds']:.1f} s, compute utilization "
        f"{100 * s['compute_utilization']:.1f} %, final eval loss {s['final_eval_loss']:.4f}")
    lines.append(f"namespaces removed: {', '.join(r['namespaces_removed']) or 'none'}; report: {s['run_dir']}/wan.json")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    app.command(
        "wan", help=HELP,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(wan)
