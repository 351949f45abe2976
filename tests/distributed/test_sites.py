"""A worker is a site: W workers × R ranks under torchrun (2 × 2 gloo processes here),
DDP or FSDP2 inside a site, the exchange between sites shard by shard.

The invariant: W workers × R ranks at per-rank batch b train as W workers × 1 rank at
batch R·b. Not bit for bit: the site averages gradients over its ranks (DDP's
all-reduce, FSDP's reduce-scatter) where one rank takes the mean over its whole batch,
a different order of float sums (about 1e-7 relative per step); through a lossy codec
such differences can move a value across a rounding threshold now and then. So the loss
curve is compared to 1e-4 relative, θ_g to 1e-5 with fp32 on the wire, and with fp4 (DDP,
whose shards hold the same codec blocks) to one rounding step in a few values. FSDP's
shards are its own (row chunks of each parameter), so under fp4 its blocks group other
values than a one-rank worker's: the same bytes, not the same codes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from farsync.codecs import get_codec
from farsync.comm.exchange import HANDSHAKE_NBYTES, make_plan
from farsync.comm.site import shard_numel
from farsync.train import checkpoint as ckpt

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(300)]

CACHE = os.path.join(os.path.dirname(__file__), "..", "..", ".cache", "farsync")
W, R, B = 2, 2, 2
ARGS = ["--model.size=nano", "--model.seq_len=64", "--data.max_bytes=1000000", "--data.val_fraction=0.1",
        f"--data.cache_dir={CACHE}", "--data.vocab_size=512", "--train.eval_every=6", "--train.eval_batches=2",
        "--train.log_every=2", "--train.threads=1", "--train.progress=false", "--algo.inner_steps=4",
        "--algo.fragments=2", "--algo.sync_delay=1", "--optim.warmup_steps=2", f"--algo.workers={W}",
        "--train.steps=12", "--train.checkpoint_every=6"]


def torchrun(tmp_path, name, *extra, env=None):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={W * R}",
                        "-m", "farsync", "train", *ARGS, f"--train.batch_size={B}", f"--train.run_dir={tmp_path}",
                        f"--train.name={name}", *extra], capture_output=True, text=True, timeout=240,
                       env={**os.environ, **(env or {})})
    return r


def one_rank(tmp_path, name, *extra):
    """The reference: W workers of one rank each, R times the batch, in one process."""
    r = subprocess.run([sys.executable, "-m", "farsync", "train", *ARGS, f"--train.batch_size={B * R}",
                        f"--train.run_dir={tmp_path}", f"--train.name={name}", "--train.launch=inprocess", *extra],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    return summary(tmp_path, name)


def summary(tmp_path, name):
    return json.loads((tmp_path / name / "summary.json").read_text())


def train_losses(tmp_path, name):
    return [r["train_loss"] for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


def state(tmp_path, name, worker, rank=None, step=12):
    return ckpt.load_worker(str(tmp_path / name), step, worker if rank is None else f"{worker}.r{rank}")


def theta_g(tmp_path, name, worker, sharded=False, site=True):
    """θ_g from a site's checkpoint files: rank 0's (DDP: whole), or every rank's shards
    joined (FSDP2 shards each parameter in row chunks, rank order); ``site`` False: a
    one-rank worker's file."""
    if not site:
        return state(tmp_path, name, worker)["algo"]["anchors"]
    if not sharded:
        return state(tmp_path, name, worker, 0)["algo"]["anchors"]
    parts = [state(tmp_path, name, worker, r)["algo"]["anchors"] for r in range(R)]
    return [[torch.cat(ps) for ps in zip(*fr)] for fr in zip(*parts)]


def local_sizes(tmp_path, name, fragment):
    """Each rank's values of ``fragment`` (FSDP2: its row chunks)."""
    return [sum(a.numel() for a in state(tmp_path, name, 0, r)["algo"]["anchors"][fragment]) for r in range(R)]


def flat(anchors):
    return torch.cat([a.reshape(-1) for f in anchors for a in f])


@pytest.fixture(scope="module")
def fp32_reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    return tmp, one_rank(tmp, "ref", "--algo.codec=fp32")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_sites_of_two_ranks_train_as_two_workers_of_twice_the_batch(tmp_path, fp32_reference, parallel):
    ref_dir, ref = fp32_reference
    r = torchrun(tmp_path, parallel, "--algo.codec=fp32", f"--site.parallel={parallel}")
    assert r.returncode == 0, r.stderr[-3000:]
    got = summary(tmp_path, parallel)
    assert got["site"]["ranks"] == R and got["site"]["parallel"] == parallel
    assert got["tokens"] == ref["tokens"] and got["sync_events"] == ref["sync_events"]
    torch.testing.assert_close(train_losses(tmp_path, parallel), train_losses(ref_dir, "ref"), rtol=1e-4, atol=0)
    assert abs(got["final_eval_loss"] - ref["final_eval_loss"]) < 1e-4 * ref["final_eval_loss"]
    sharded = parallel == "fsdp"
    for w in range(W):
        torch.testing.assert_close(flat(theta_g(tmp_path, parallel, w, sharded)), flat(theta_g(ref_dir, "ref", 0, site=False)),
                                   rtol=0, atol=1e-5)
    # θ_g is the same bits on every rank of every site (DDP: whole; FSDP: each rank's shard)
    for rank in range(R):
        a = state(tmp_path, parallel, 0, rank)["algo"]["anchors"]
        b = state(tmp_path, parallel, 1, rank)["algo"]["anchors"]
        assert all(torch.equal(x, y) for fx, fy in zip(a, b) for x, y in zip(fx, fy))
    if not sharded:  # a site's ranks hold one replica: the same parameters after every step
        m0, m1 = state(tmp_path, parallel, 0, 0)["model"], state(tmp_path, parallel, 0, 1)["model"]
        assert all(torch.equal(m0[k], m1[k]) for k in m0)
    # the cross-site bytes of a worker: R streams, each a shard's payload (cut at whole codec
    # blocks) and its handshake with every peer; a one-rank worker: one payload and handshake
    sizes = [sum(a.numel() for a in f) for f in theta_g(ref_dir, "ref", 0, site=False)]
    syncs = [x["fragment"] for x in map(json.loads, (tmp_path / parallel / "metrics.jsonl").read_text().splitlines())
             if x["kind"] == "sync"]
    fp32 = get_codec("fp32")
    one = sum(make_plan(sizes[f], W, fp32).bytes_sent + (W - 1) * HANDSHAKE_NBYTES for f in syncs)
    shards = [local_sizes(tmp_path, parallel, f) if sharded else [shard_numel(sizes[f], R, 1)] * R for f in range(len(sizes))]
    site = sum(make_plan(n, W, fp32).bytes_sent + (W - 1) * HANDSHAKE_NBYTES for f in syncs for n in shards[f])
    assert ref["bytes_sent_per_worker"] == [one] * W
    assert got["bytes_sent_per_worker"] == [site] * W
    if sharded:
        assert got["site"]["site_bytes_per_worker"] == [0, 0]  # FSDP gathers nothing
    else:
        assert all(b > 0 for b in got["site"]["site_bytes_per_worker"])


def test_fp4_sites_keep_the_codec_blocks_of_one_rank(tmp_path):
    """DDP's shards are cut at codec blocks: the fp4 payloads hold the same blocks as one
    rank's, so θ_g differs only where a float-rounding difference moved a value across a
    rounding threshold."""
    ref = one_rank(tmp_path, "ref", "--algo.codec=fp4-e3m0")
    r = torchrun(tmp_path, "ddp", "--algo.codec=fp4-e3m0", "--site.parallel=ddp")
    assert r.returncode == 0, r.stderr[-3000:]
    got = summary(tmp_path, "ddp")
    a, b = flat(theta_g(tmp_path, "ddp", 0)), flat(theta_g(tmp_path, "ref", 0, site=False))
    d = (a - b).abs()  # float noise everywhere (ulps), a rounding step in a few values
    assert float(d.mean()) < 1e-6 and float((d > 1e-5).float().mean()) < 0.01
    torch.testing.assert_close(train_losses(tmp_path, "ddp"), train_losses(tmp_path, "ref"), rtol=1e-4, atol=0)
    assert got["sync_events"] == ref["sync_events"]


def test_a_nan_in_one_ranks_shard_leaves_the_whole_worker_out_on_every_rank(tmp_path):
    """Rank 1 of worker 1 sends NaN in its shard only; its site peer's shard is clean. The
    receivers decide per worker: every rank of both sites leaves worker 1 out of every
    round, and all of them hold the same θ_g."""
    r = torchrun(tmp_path, "nan", "--algo.codec=fp4-e3m0", "--site.parallel=fsdp", "--train.fault=nan",
                 "--train.faulty_worker=1", "--train.faulty_rank=1", "--algo.exchange=all-gather")
    assert r.returncode == 0, r.stderr[-3000:]
    got = summary(tmp_path, "nan")
    assert got["exclusions"] and {e["worker"] for e in got["exclusions"]} == {1}
    assert len(got["exclusions"]) == got["sync_events"]  # every round
    syncs = [x for x in map(json.loads, (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines())
             if x["kind"] == "sync"]
    assert all(s["excluded"] == [1] and s["kept"] == [0] for s in syncs)
    for rank in range(R):  # the same decision everywhere: θ_g identical across sites, rank by rank
        a = state(tmp_path, "nan", 0, rank)["algo"]
        b = state(tmp_path, "nan", 1, rank)["algo"]
        assert a["exclusions"] == b["exclusions"]
        assert all(torch.equal(x, y) for fx, fy in zip(a["anchors"], b["anchors"]) for x, y in zip(fx, fy))


def test_a_site_run_resumed_from_its_checkpoint_equals_the_uninterrupted_run(tmp_path):
    """FSDP (every rank's shards in its own file): killed after step 8, resumed from the
    checkpoint of step 6, it ends where the uninterrupted run ends, bit for bit."""
    args = ("--algo.codec=fp4-e3m0", "--site.parallel=fsdp")
    full = torchrun(tmp_path, "full", *args)
    assert full.returncode == 0, full.stderr[-3000:]
    cut = torchrun(tmp_path, "cut", *args, env={"FARSYNC_DIE_AT": "9"})
    assert cut.returncode != 0 and ckpt.latest_step(str(tmp_path / "cut")) == 6
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={W * R}",
                              "-m", "farsync", "train", "--resume", str(tmp_path / "cut")],
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for w in range(W):
        for rank in range(R):
            a, b = state(tmp_path, "full", w, rank)["algo"], state(tmp_path, "cut", w, rank)["algo"]
            assert all(torch.equal(x, y) for fx, fy in zip(a["anchors"], b["anchors"]) for x, y in zip(fx, fy))
    assert summary(tmp_path, "cut")["final_eval_loss"] == summary(tmp_path, "full")["final_eval_loss"]
    assert train_losses(tmp_path, "cut") == train_losses(tmp_path, "full")
    # farsync export writes one Hugging Face folder from the ranks' shards: θ_g whole
    pytest.importorskip("transformers")
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, "-m", "farsync", "export", str(tmp_path / "cut"), str(out)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file

    exported = load_file(str(out / "model.safetensors"))
    names = state(tmp_path, "cut", 0, 0)["algo"]["fragment_names"]
    anchors = theta_g(tmp_path, "cut", 0, sharded=True)
    emb = next(a for ns, fa in zip(names, anchors) for n, a in zip(ns, fa) if n == "tok_emb.weight")
    assert torch.equal(exported["model.embed_tokens.weight"], emb)
