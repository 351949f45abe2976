"""farsync on one NVIDIA GPU: tests, inner-step speed and MFU, codecs, memory, overlap and
quality, in one run of under 10 minutes (benchmarks/gpu/run.sh starts it).

Parts, in order, each capped in time; the JSON is rewritten after every part, so a part
that runs out of time leaves the ones before it:

1. ``tests``: pytest of every test with a CUDA variant (codecs CUDA == CPU payloads bit for
   bit, tests/gpu/test_cuda.py: the loop on cuda, offload, gloo from the GPU).
2. ``ceilings``: the bf16 matrix rate (8192^3 products) and the device-to-device copy
   bandwidth (a 1 GiB buffer) measured here: the peaks MFU and codec speed are held against.
3. ``speed``: tokens/s and MFU of the 35m, 200m and 1b models (M = 1, sequence 2048,
   vocabulary 32,000, bf16 autocast, SDPA, fused AdamW): plain steps against the DiLoCo
   wrapper's steps that do not sync (Streaming, P = 4, H beyond the window), alternated;
   then ``torch.compile`` of the model at 200m and 1b while time is left.
   MFU = 6 N tokens/s / measured bf16 peak, N = every parameter but the input embedding
   (a lookup); ``mfu_with_attention`` adds causal attention's 6 L T d per token.
4. ``codecs``: encode + decode GB/s of fp32 input on a 1 GiB buffer, eager and under
   ``torch.compile`` (kept only where its payload is the eager one's bit for bit), and
   whether the CUDA payload equals the CPU's on a 16 Mi-value slice.
5. ``memory``: peak allocated device memory at 1b for plain training, DiLoCo (θ_g and outer
   momentum on the device) and DiLoCo with ``offload`` (both in pinned host memory), over
   steps that include syncs.
6. ``overlap``: two processes on the one GPU, gloo between them, Streaming (200m, P = 4,
   tau = 2, fp4): an inner step's time with a fragment in flight against one without.
7. ``quality``: DP vs Streaming + overlap + fp4 at M = 2 and M = 4, simulated in one
   process on the GPU, as many tokens as the time left allows (the JSON says how many).

    python benchmarks/gpu/gpu_bench.py --out DIR [--budget-s 480]

Writes ``DIR/gpu.json`` (and ``DIR/gpu.png`` at the end).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "src"))

from farsync.algorithms import DiLoCo  # noqa: E402
from farsync.codecs import get_codec  # noqa: E402
from farsync.comm import InProcessGroup  # noqa: E402
from farsync.models import Llama, model_config  # noqa: E402

VOCAB, SEQ = 32_000, 2048
BATCH = {"35m": 32, "200m": 16, "1b": 8}  # sequences per step
BIG = 1 << 28  # the codecs' buffer: 1 GiB of fp32
DEV = "cuda"
SIZE = {"35m": "35m", "200m": "200m", "1b": "1b", "small": "small"}  # --dry: every size is nano


def dry_run() -> None:
    """--dry: the same code at toy sizes, on the CPU when there is no GPU (a check of the
    script itself before it spends device time; its figures mean nothing)."""
    global VOCAB, SEQ, BIG, DEV
    VOCAB, SEQ, BIG = 512, 64, 1 << 20
    DEV = "cuda" if torch.cuda.is_available() else "cpu"
    for k in SIZE:
        SIZE[k] = "nano"
    for k in SHARES:
        SHARES[k] = max(20, SHARES[k] // 4)


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16) if DEV == "cuda" else contextlib.nullcontext()


def peak_gb(reserved: bool = False) -> float:
    if DEV != "cuda":
        return 0.0
    return (torch.cuda.max_memory_reserved() if reserved else torch.cuda.max_memory_allocated()) / 1e9


def reset_peak() -> None:
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
CODECS = ["fp4-e3m0", "fp4-e2m1", "int8", "bf16", "topk64-int2", "topk16-fp4"]


#: each part's share of the budget, in seconds; a part ends by the sum of its own and the
#: earlier parts' shares (time an earlier part did not use goes to the later ones), and
#: quality, the last, takes whatever is left
SHARES = {"tests": 120, "ceilings": 15, "speed": 100, "compile": 70, "codecs": 45, "memory": 55, "overlap": 55}


class Clock:
    def __init__(self, budget_s: float):
        self.t0 = time.monotonic()
        self.budget_s = budget_s
        self.part_end = budget_s

    def start(self, part: str) -> None:
        names = list(SHARES)
        self.part_end = (sum(SHARES[n] for n in names[: names.index(part) + 1]) if part in SHARES
                         else self.budget_s)
        self.part_end = min(self.part_end, self.budget_s)

    def left(self) -> float:
        """Seconds left to the current part."""
        return self.part_end - (time.monotonic() - self.t0)


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def cuda_time(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` on the device (CUDA events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if DEV != "cuda":
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def free() -> None:
    import gc

    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


# ---- parts ---------------------------------------------------------------------------

def part_tests(res: dict, clock: Clock, out: str) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rs",
           "tests/gpu", "tests/unit/test_codecs.py", "tests/unit/test_sparse_codecs.py", "-k", "cuda or gpu or CUDA"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH", "")]))
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(10, clock.left()))
        text, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
    with open(os.path.join(out, "pytest.log"), "w") as f:
        f.write(text)
    tail = [line for line in text.strip().splitlines() if line.strip()][-1:] or [""]
    res["tests"] = {"command": " ".join(cmd[2:]), "exit_code": rc, "summary": tail[0],
                    "seconds": round(time.monotonic() - t0, 1)}
    log("tests:", rc, tail[0])


def part_ceilings(res: dict, clock: Clock, out: str) -> None:
    n = 8192 if DEV == "cuda" and BIG == 1 << 28 else 256
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    t = cuda_time(lambda: a @ b, 10, warmup=3)
    peak = 2 * n ** 3 / t
    x = torch.randn(BIG, device=DEV)  # 1 GiB of fp32
    y = torch.empty_like(x)
    tc = cuda_time(lambda: y.copy_(x), 10, warmup=2)
    res["bf16_peak_tflops"] = round(peak / 1e12, 1)
    res["bf16_peak_flops"] = peak
    res["bf16_peak_how"] = "median of 10 bf16 8192x8192x8192 products (torch.matmul) on random data, after 3 warm-ups"
    res["copy_gbps"] = round(x.numel() * 4 / tc / 1e9, 1)
    res["copy_how"] = ("1 GiB device-to-device copy (y.copy_(x)), GB/s of the buffer's bytes (read + write move "
                       "twice that)")
    log(f"peak {res['bf16_peak_tflops']} TFLOP/s, copy {res['copy_gbps']} GB/s")
    del a, b, x, y
    free()


def _model(size: str):
    torch.manual_seed(0)
    with torch.device(DEV):  # initialised on the device: seconds, not a minute, at 1b
        model = Llama(model_config(SIZE[size], VOCAB, SEQ))
    n = sum(p.numel() for name, p in model.named_parameters() if "tok_emb" not in name)
    return model, n


def _batch(B: int):
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randint(0, VOCAB, (B, SEQ), device=DEV, generator=g)
    return x, torch.roll(x, -1, 1)


def _steps(model, opt, algo, x, y, n: int, compiled=None) -> float:
    """Seconds per step over ``n`` steps (synchronised at both ends)."""
    fwd = compiled or model
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        with autocast():
            _, loss = fwd(x, y)
        loss.backward()
        if algo is None:
            opt.step()
        else:
            algo.step()
        opt.zero_grad(set_to_none=True)
    sync()
    return (time.perf_counter() - t0) / n


def part_speed(res: dict, clock: Clock, out: str) -> None:
    peak = res["bf16_peak_flops"]
    res.setdefault("speed", {})
    res.setdefault("mfu", {})
    for size in ("35m", "200m", "1b"):
        if clock.left() < {"35m": 10, "200m": 10, "1b": 30}[size]:
            log("speed: no time left for", size)
            break
        model, n = _model(size)
        cfg = model.cfg
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEV == "cuda")
        algo = DiLoCo(model, opt, InProcessGroup(1).communicator(0), mode="streaming", inner_steps=10**9,
                      fragments=4, sync_delay=1, codec="fp4-e3m0")
        B = BATCH[size]
        x, y = _batch(B)
        _steps(model, opt, None, x, y, 3)  # warm-up: kernels, allocator, AdamW state
        _steps(model, opt, algo, x, y, 2)
        plain, wrapped = [], []
        for _ in range(3):
            plain.append(_steps(model, opt, None, x, y, 4))
            wrapped.append(_steps(model, opt, algo, x, y, 4))
        tp, tw = statistics.median(plain), statistics.median(wrapped)
        tokens = B * SEQ
        attn = 6 * cfg.n_layers * SEQ * cfg.dim  # causal: half of 12 L T d per token
        row = {"parameters": sum(p.numel() for p in model.parameters()), "flop_parameters": n, "batch": B,
               "seq": SEQ, "tokens_per_step": tokens,
               "plain_step_s": round(tp, 5), "wrapper_step_s": round(tw, 5),
               "plain_tokens_per_s": round(tokens / tp), "wrapper_tokens_per_s": round(tokens / tw),
               "mfu": round(6 * n * tokens / tp / peak, 4),
               "mfu_with_attention": round((6 * n + attn) * tokens / tp / peak, 4),
               "wrapper_overhead_pct": round(100 * (tw - tp) / tp, 2),
               "peak_memory_gb": round(peak_gb(), 2)}
        res["speed"][size] = row
        res["mfu"][size] = row["mfu"]
        log("speed", size, row)
        del algo, opt, model, x, y
        free()
        reset_peak()
        write(res, out)
    res["wrapper_overhead_pct"] = max(r["wrapper_overhead_pct"] for r in res["speed"].values())
    write(res, out)


def part_compile(res: dict, clock: Clock, out: str) -> None:
    """torch.compile of the model, while there is time for it (a compile cannot be cut short)."""
    peak = res["bf16_peak_flops"]
    for size, need in (("200m", 50), ("1b", 60)):
        if clock.left() < need or size not in res.get("speed", {}):
            break
        try:
            model, n = _model(size)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEV == "cuda")
            compiled = torch.compile(model)
            x, y = _batch(BATCH[size])
            t0 = time.perf_counter()
            _steps(model, opt, None, x, y, 2, compiled)
            compile_s = time.perf_counter() - t0
            tp = statistics.median(_steps(model, opt, None, x, y, 4, compiled) for _ in range(3))
            tokens = BATCH[size] * SEQ
            row = res["speed"][size]
            row["compiled_step_s"] = round(tp, 5)
            row["compiled_tokens_per_s"] = round(tokens / tp)
            row["compiled_mfu"] = round(6 * n * tokens / tp / peak, 4)
            row["compile_seconds"] = round(compile_s, 1)
            res.setdefault("mfu_compiled", {})[size] = row["compiled_mfu"]
            log("compiled", size, row)
        except Exception as e:  # noqa: BLE001 - a failed compile is a result
            res["speed"][size]["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        finally:
            model = opt = compiled = None
            free()
        write(res, out)


def part_codecs(res: dict, clock: Clock, out: str) -> None:
    x = torch.randn(BIG, device=DEV)
    n = x.numel()
    xs = x[: BIG >> 4]
    xs_cpu = xs.cpu()
    res.setdefault("codec_gbps", {})
    res.setdefault("codecs", {})
    for i, name in enumerate(CODECS):
        if clock.left() < 5:
            break
        c = get_codec(name)
        row: dict = {}
        try:
            row["cuda_equals_cpu"] = bool(torch.equal(c.encode(xs).cpu(), c.encode(xs_cpu)))
            payload = c.encode(x)
            buf = torch.empty(n, device=DEV)
            te = cuda_time(lambda: c.encode(x), 5)
            td = cuda_time(lambda: c.decode(payload, n, out=buf), 5)
            row.update(encode_gbps=round(4 * n / te / 1e9, 1), decode_gbps=round(4 * n / td / 1e9, 1),
                       gbps=round(4 * n / (te + td) / 1e9, 1))
            row["fraction_of_copy"] = round(row["gbps"] / res["copy_gbps"], 3) if res.get("copy_gbps") else None
            res["codec_gbps"][name] = row["gbps"]
            if name in ("fp4-e3m0", "int8") and clock.left() > 25:
                try:
                    enc, dec = torch.compile(c.encode), torch.compile(c.decode)
                    same = torch.equal(enc(x), payload) and torch.equal(dec(payload, n, out=buf).clone(),
                                                                        c.decode(payload, n))
                    row["compiled_bit_identical"] = bool(same)
                    tce = cuda_time(lambda: enc(x), 5)
                    tcd = cuda_time(lambda: dec(payload, n, out=buf), 5)
                    row["compiled_gbps"] = round(4 * n / (tce + tcd) / 1e9, 1)
                except Exception as e:  # noqa: BLE001
                    row["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            del payload, buf
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        res["codecs"][name] = row
        log("codec", name, row)
        free()
        write(res, out)
    del x, xs
    free()


def part_memory(res: dict, clock: Clock, out: str) -> None:
    size, B = "1b", 4
    res.setdefault("memory", {"size": size, "batch": B, "seq": SEQ, "how": (
        "torch.cuda.max_memory_allocated from before the model is built through 6 steps (mode diloco, H = 2: "
        "three syncs; M = 1, so no payload is encoded: theta_g, outer momentum and the pseudo-gradient's "
        "buffers are what DiLoCo adds); plain: the same steps without the wrapper")})
    for variant in ("plain", "diloco", "offloaded"):
        if clock.left() < 12:
            break
        free()
        reset_peak()
        model, _ = _model(size)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEV == "cuda")
        algo = None
        if variant != "plain":
            algo = DiLoCo(model, opt, InProcessGroup(1).communicator(0), mode="diloco", inner_steps=2,
                          codec="fp4-e3m0", offload=variant == "offloaded")
        x, y = _batch(B)
        t0 = time.perf_counter()
        step_s = _steps(model, opt, algo, x, y, 6)
        res["memory"][variant] = {"peak_gb": round(peak_gb(), 3), "reserved_gb": round(peak_gb(True), 3),
                                  "mean_step_s_with_syncs": round(step_s, 3),
                                  "seconds": round(time.perf_counter() - t0, 1)}
        log("memory", variant, res["memory"][variant])
        del algo, opt, model, x, y
        free()
        write(res, out)
    m = res["memory"]
    if "plain" in m and m["plain"]["peak_gb"] > 0:
        res["memory_overhead_pct"] = {name: round(100 * (m[v]["peak_gb"] - m["plain"]["peak_gb"]) / m["plain"]["peak_gb"], 2)
                                      for name, v in (("naive", "diloco"), ("offloaded", "offloaded")) if v in m}
    write(res, out)


def _overlap_worker(rank: int, path: str, out: str, steps: int, dry: bool) -> None:
    import torch.distributed as dist

    if dry:
        dry_run()
    from farsync.comm.distributed import TorchDistributedCommunicator

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    comm = TorchDistributedCommunicator()
    model, _ = _model("200m")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEV == "cuda")
    algo = DiLoCo(model, opt, comm, mode="streaming", inner_steps=20, fragments=4, sync_delay=2, codec="fp4-e3m0")
    x, y = _batch(8)
    rows = []
    for s in range(steps):
        busy = bool(algo.in_flight)
        sync()
        t0 = time.perf_counter()
        with autocast():
            _, loss = model(x, y)
        loss.backward()
        algo.step()
        opt.zero_grad(set_to_none=True)
        sync()
        rows.append({"step": s + 1, "in_flight": busy, "seconds": time.perf_counter() - t0})
    algo.finish()
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump({"rows": rows, "blocked_seconds": algo.stats.blocked_seconds, "bytes_sent": algo.stats.bytes_sent}, f)
    comm.close()
    dist.destroy_process_group()


def part_overlap(res: dict, clock: Clock, out: str) -> None:
    import tempfile

    import torch.multiprocessing as mp

    steps = 80
    d = tempfile.mkdtemp()
    t0 = time.perf_counter()
    mp.start_processes(_overlap_worker, args=(os.path.join(d, "store"), os.path.join(d, "res"), steps, DEV != "cuda" or BIG != 1 << 28), nprocs=2,
                       start_method="spawn")
    per = []
    for r in range(2):
        with open(os.path.join(d, f"res.{r}.json")) as f:
            per.append(json.load(f))
    warm = 20  # the first round: kernels and AdamW state
    busy = [row["seconds"] for p in per for row in p["rows"][warm:] if row["in_flight"]]
    idle = [row["seconds"] for p in per for row in p["rows"][warm:] if not row["in_flight"]]
    mb, mi = statistics.median(busy), statistics.median(idle)
    res["overlap"] = {
        "setup": "2 processes on the one GPU, gloo (buffers via pinned host memory), 200m, Streaming H = 20, P = 4, "
                 "tau = 2, fp4-e3m0, batch 8 x 2048 each; steps 21-80 of both processes",
        "step_s_in_flight_median": round(mb, 4), "step_s_not_in_flight_median": round(mi, 4),
        "in_flight_over_not_pct": round(100 * (mb - mi) / mi, 2), "steps_in_flight": len(busy),
        "steps_not_in_flight": len(idle), "blocked_seconds": [round(p["blocked_seconds"], 3) for p in per],
        "bytes_sent": [p["bytes_sent"] for p in per], "seconds": round(time.perf_counter() - t0, 1)}
    log("overlap", res["overlap"])
    write(res, out)


def part_quality(res: dict, clock: Clock, out: str) -> None:
    from farsync.train import train
    from farsync.train.config import build_config

    size, seq, gbatch, vocab = SIZE["small"], min(256, SEQ * 4), 128, 4096 if BIG == 1 << 28 else 512
    left = clock.left() - 20
    if left < 45:
        return
    # steps sized from the time left for three runs: DP (M = 1, the whole batch), Streaming at M = 2 and 4
    base = ["--model.size=" + size, f"--model.seq_len={seq}", f"--data.vocab_size={vocab}", f"--train.device={DEV}",
            "--train.launch=inprocess", "--train.progress=false", "--train.checkpoint_every=0",
            "--optim.lr=1e-3", "--optim.warmup_steps=20", "--train.run_dir=/tmp/farsync-gpu-runs"]
    probe = build_config(None, base + ["--algo.mode=dp", "--algo.workers=1", f"--train.batch_size={gbatch}",
                                       "--train.steps=20", "--train.eval_every=20", "--train.name=probe"])
    t0 = time.perf_counter()
    ps = train(probe)
    per_step = ps.get("wall_seconds", time.perf_counter() - t0) / 20  # the tokenizer's training left out
    # M = 4 steps cost about 2x a DP step here (four smaller batches, one after another)
    steps = int(left / (per_step * (1 + 1.5 + 2.0)) * 0.8) // 40 * 40
    steps = max(40, min(steps, 4000))
    res["quality_setup"] = {"model": size, "seq": seq, "global_batch": gbatch, "vocab": vocab, "steps": steps,
                            "probe_step_s": round(per_step, 4), "H": 20, "P": 2, "tau": 1, "codec": "fp4-e3m0",
                            "note": "tokens are what the time left allowed, not 20 per parameter"}
    runs = {}
    specs = [("dp", 1, ["--algo.mode=dp"]),
             ("streaming-overlap-fp4", 2, []), ("streaming-overlap-fp4", 4, [])]
    for method, M, extra in specs:
        if clock.left() < 15:
            break
        o = base + [f"--algo.workers={M}", f"--train.batch_size={gbatch // M}", f"--train.steps={steps}",
                    f"--train.eval_every={steps // 4}", f"--train.eval_batches={max(1, 512 // (gbatch // M))}",
                    f"--train.name={method}-{M}"] + (extra or [
                        "--algo.mode=streaming", "--algo.inner_steps=20", "--algo.fragments=2", "--algo.sync_delay=1",
                        "--algo.codec=fp4-e3m0"])
        t0 = time.perf_counter()
        s = train(build_config(None, o))
        runs[(method, M)] = s
        log("quality", method, M, s["final_eval_loss"], round(time.perf_counter() - t0, 1), "s")
        dp = runs.get(("dp", 1))
        res["quality"] = [{"method": m, "workers": w, "parameters": r["parameters"], "tokens": r["tokens"],
                           "eval_loss": r["final_eval_loss"], "dp_eval_loss": dp["final_eval_loss"] if dp else None,
                           "gap_pct": round(100 * (r["final_eval_loss"] / dp["final_eval_loss"] - 1), 2) if dp else None,
                           "bytes_sent_total": r.get("bytes_sent_total"), "wall_seconds": r.get("wall_seconds")}
                          for (m, w), r in runs.items()]
        write(res, out)


# ---- driver ----------------------------------------------------------------------------

def write(res: dict, out: str) -> None:
    tmp = os.path.join(out, "gpu.json.tmp")
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, os.path.join(out, "gpu.json"))


def plot(res: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    sp = res.get("speed", {})
    if sp:
        names = list(sp)
        ax[0].bar([i - 0.2 for i in range(len(names))], [sp[k]["mfu"] * 100 for k in names], 0.4, label="eager")
        ax[0].bar([i + 0.2 for i in range(len(names))], [sp[k].get("compiled_mfu", 0) * 100 for k in names], 0.4,
                  label="torch.compile")
        ax[0].set_xticks(range(len(names)), names)
        ax[0].axhline(40, ls=":", c="k")
        ax[0].set_ylabel("MFU % (6N, measured bf16 peak)")
        ax[0].legend()
    cg = res.get("codecs", {})
    if cg:
        names = [k for k in cg if "gbps" in cg[k]]
        ax[1].barh(names, [cg[k]["gbps"] for k in names], label="eager")
        ax[1].barh(names, [cg[k].get("compiled_gbps", 0) for k in names], alpha=0.5, label="compiled")
        if res.get("copy_gbps"):
            ax[1].axvline(res["copy_gbps"] / 2, ls=":", c="k", label="50 % of copy")
        ax[1].set_xlabel("encode+decode GB/s (fp32 input, 1 GiB)")
        ax[1].legend()
    mem = res.get("memory", {})
    names = [k for k in ("plain", "diloco", "offloaded") if k in mem]
    if names:
        ax[2].bar(names, [mem[k]["peak_gb"] for k in names])
        ax[2].set_ylabel("peak allocated GB (1b)")
    fig.suptitle(f"farsync on {res.get('device', '?')}")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "gpu.png"), dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=540)
    ap.add_argument("--parts", default=",".join([*SHARES, "quality"]))
    ap.add_argument("--dry", action="store_true", help="toy sizes (on the CPU without a GPU): checks the script")
    args = ap.parse_args()
    if args.dry:
        dry_run()
    os.makedirs(args.out, exist_ok=True)
    clock = Clock(args.budget_s)
    cuda = DEV == "cuda"
    res = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (--dry)",
           "capability": list(torch.cuda.get_device_capability(0)) if cuda else None, "dry": bool(args.dry),
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "cpus": os.cpu_count(), "date": dt.date.today().isoformat(), "errors": {}}
    try:
        res["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    write(res, args.out)
    parts = {"tests": part_tests, "ceilings": part_ceilings, "speed": part_speed, "compile": part_compile,
             "codecs": part_codecs, "memory": part_memory, "overlap": part_overlap, "quality": part_quality}
    for name in args.parts.split(","):
        t0 = time.monotonic()
        clock.start(name)
        log("part", name, f"({clock.left():.0f} s left)")
        try:
            parts[name](res, clock, args.out)
        except Exception as e:  # noqa: BLE001 - one part's failure must not lose the others
            res["errors"][name] = f"{type(e).__name__}: {e}"[:2000]
            traceback.print_exc()
            free()
        res.setdefault("part_seconds", {})[name] = round(time.monotonic() - t0, 1)
        write(res, args.out)
    try:
        plot(res, args.out)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    log("done")


if __name__ == "__main__":
    main()
