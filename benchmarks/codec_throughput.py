"""Codec throughput and accuracy on CPU.

For every codec (round-to-nearest, plus the stochastic-rounding variants of the lossy
dense ones; the sparse ``topk*`` codecs are round-to-nearest only) this measures encode,
decode and encode+decode throughput on ``--numel`` fp32 values, in GB/s of fp32 input
(4 bytes x numel / seconds; median of ``--repeats`` timed runs after one warm-up run), the
payload size in bits per value (scales and, for the sparse codecs, positions included) and
the relative RMS error ||decode(encode(x)) - x|| / ||x|| on standard-normal x. For the
sparse codecs that error is mostly the values they drop (about sqrt(1 - kept energy));
``kept_rel_rms_error`` is the same ratio over the kept positions only (the quantization
error of what is sent).

    python benchmarks/codec_throughput.py [--numel 16777216] [--repeats 7] [--threads 1] [--out benchmarks/results]
    python benchmarks/codec_throughput.py --codecs sparse --out /tmp/codecs   # or dense, all, or a list
    python benchmarks/codec_throughput.py --replot   # redraw the PNG from the JSON

Writes ``<out>/codecs.json`` and ``<out>/codecs.png``. The figures are only meaningful on
an otherwise idle machine (the JSON records the 1-minute load average before and after);
on the shared dev box run it under ``flock /tmp/farsync-bench.lock``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI / dev boxes
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from farsync.codecs import ALL_CODEC_NAMES, CODEC_NAMES, SPARSE_CODEC_NAMES, get_codec  # noqa: E402


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch allocations, lazy tables
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_codec(name: str, stochastic: bool, x: torch.Tensor, repeats: int) -> dict:
    codec = get_codec(name, stochastic_rounding=stochastic)
    n = x.numel()
    gen = torch.Generator().manual_seed(0)
    payload = codec.encode(x, gen)
    y = codec.decode(payload, n)
    rel_rms = ((y.double() - x.double()).norm() / x.double().norm()).item()
    kept_rel_rms = None
    if codec.sparse:  # error over the kept positions: the top 1/D of |x| of each chunk
        xb = x.view(-1, codec.block_size)
        idx = xb.abs().topk(codec.block_size // codec.keep_every, dim=1).indices
        xk, yk = xb.gather(1, idx).double(), y.view_as(xb).gather(1, idx).double()
        kept_rel_rms = ((yk - xk).norm() / xk.norm()).item()

    t_enc = _median_seconds(lambda: codec.encode(x, gen), repeats)
    t_dec = _median_seconds(lambda: codec.decode(payload, n), repeats)
    t_rt = _median_seconds(lambda: codec.decode(codec.encode(x, gen), n), repeats)
    # decoding into a buffer the caller reuses: no page faults of a fresh output
    out = torch.empty(n)
    t_dec_reuse = _median_seconds(lambda: codec.decode(payload, n, out=out), repeats)
    t_rt_reuse = _median_seconds(lambda: codec.decode(codec.encode(x, gen), n, out=out), repeats)
    gb = 4 * n / 1e9  # fp32 input bytes, in GB
    return {
        "codec": name,
        "stochastic_rounding": stochastic,
        "block_size": getattr(codec, "block_size", None),
        "sparse": codec.sparse,
        "density": codec.density,
        "payload_bytes": payload.numel(),
        "bits_per_value": 8 * payload.numel() / n,
        "encode_gbps": gb / t_enc,
        "decode_gbps": gb / t_dec,
        "roundtrip_gbps": gb / t_rt,
        "decode_reuse_gbps": gb / t_dec_reuse,
        "roundtrip_reuse_gbps": gb / t_rt_reuse,
        "encode_ms": 1e3 * t_enc,
        "decode_ms": 1e3 * t_dec,
        "roundtrip_ms": 1e3 * t_rt,
        "rel_rms_error": rel_rms,
        "kept_rel_rms_error": kept_rel_rms,
    }


def plot(results: list[dict], path: Path, title: str) -> None:
    labels = [r["codec"] + (" +SR" if r["stochastic_rounding"] else "") for r in results]
    xs = range(len(results))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(10, 0.6 * len(results)), 7), sharex=True)
    width = 0.2
    for k, (key, label) in enumerate(
        [("encode_gbps", "encode"), ("decode_gbps", "decode"), ("roundtrip_gbps", "encode+decode"),
         ("roundtrip_reuse_gbps", "encode+decode into a reused buffer")]
    ):
        ax1.bar([i + (k - 1.5) * width for i in xs], [r.get(key, float("nan")) for r in results], width, label=label)
    ax1.set_ylabel("GB/s of fp32 input")
    ax1.set_title(title)
    ax1.legend()
    ax1.grid(axis="y", alpha=0.3)
    errs = [r["rel_rms_error"] for r in results]
    nonzero = [e for e in errs if e > 0]
    ax2.bar(list(xs), [e if e > 0 else float("nan") for e in errs], 0.5, color="tab:gray")
    ax2.set_yscale("log")
    if nonzero:
        ax2.set_ylim(min(nonzero) / 4, max(nonzero) * 4)
    for i, e in enumerate(errs):
        if e == 0:  # fp32: no bar on a log axis, say so instead
            ax2.annotate("0 (bit-exact)", (i, 0.03), xycoords=("data", "axes fraction"), ha="center")
    ax2.set_ylabel("relative RMS error\n(Gaussian input)")
    ax2.set_xticks(list(xs))
    ax2.set_xticklabels(labels, rotation=20 if len(results) <= 12 else 60)
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _title(numel: int, machine: dict) -> str:
    return (
        f"farsync codecs, {numel:,} fp32 values, CPU "
        f"({machine['cpu_count']} cores, torch {machine['torch_version']})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel", type=int, default=16 * 1024 * 1024, help="fp32 values per buffer")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder")
    ap.add_argument("--replot", action="store_true", help="only redraw codecs.png from <out>/codecs.json")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--codecs", default="all",
                    help="all, dense, sparse, or a comma-separated list of codec names")
    args = ap.parse_args()
    groups = {"all": ALL_CODEC_NAMES, "dense": CODEC_NAMES, "sparse": SPARSE_CODEC_NAMES}
    names = groups.get(args.codecs) or tuple(c.strip() for c in args.codecs.split(",") if c.strip())
    unknown = [c for c in names if c not in ALL_CODEC_NAMES]
    if unknown:
        ap.error(f"unknown codec(s) {', '.join(unknown)}; choose from {', '.join(ALL_CODEC_NAMES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.replot:
        report = json.loads((args.out / "codecs.json").read_text())
        plot(report["results"], args.out / "codecs.png", _title(report["numel"], report["machine"]))
        return

    x = torch.randn(args.numel, generator=torch.Generator().manual_seed(0))
    # Pad to a multiple of every default block size (what the comm layer does).
    align = max(get_codec(n).alignment for n in names)
    if x.numel() % align:
        x = torch.cat([x, x.new_zeros(align - x.numel() % align)])

    load_before = os.getloadavg()  # the dev box is shared: record how busy it was
    results = []
    for name in names:
        for stochastic in (False, True):
            if stochastic and (name == "fp32" or name in SPARSE_CODEC_NAMES):
                continue
            r = bench_codec(name, stochastic, x, args.repeats)
            results.append(r)
            kept = f"  kept rel RMS {r['kept_rel_rms_error']:.3e}" if r["sparse"] else ""
            print(
                f"{name:12s} {'SR ' if stochastic else 'RTN'} {r['bits_per_value']:6.3f} bit/value  "
                f"enc {r['encode_gbps']:6.2f}  dec {r['decode_gbps']:6.2f}  "
                f"rt {r['roundtrip_gbps']:6.2f}  dec reused {r['decode_reuse_gbps']:6.2f}  "
                f"rt reused {r['roundtrip_reuse_gbps']:6.2f} GB/s  "
                f"rel RMS {r['rel_rms_error']:.3e}{kept}",
                flush=True,
            )

    machine = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "device": "cpu",
        "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    report = {
        "benchmark": "codec_throughput",
        "command": "python benchmarks/codec_throughput.py "
        f"--numel {args.numel} --repeats {args.repeats} --threads {args.threads} --codecs {args.codecs} "
        f"--out {args.out}",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "numel": x.numel(),
        "repeats": args.repeats,
        "timing": "median of repeats after one warm-up; GB/s = 4 bytes * numel / seconds",
        "machine": machine,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "codecs.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, args.out / "codecs.png", _title(x.numel(), machine))
    print(f"wrote {args.out / 'codecs.json'} and {args.out / 'codecs.png'}")


if __name__ == "__main__":
    main()
