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
def runs(tmp_path_factory):
    """The one-rank references (fp32 and fp4, in one process) and the FSDP site run (fp32)
    that several tests read."""
    tmp = tmp_path_factory.mktemp("sites")
    refs = {c: one_rank(tmp, f"ref-{c}", f"--algo.codec={c}") for c in ("fp32", "fp4-e3m0")}
    r = torchrun(tmp, "fsdp", "--algo.codec=fp32", "--site.parallel=fsdp")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, refs


def expected_bytes(tmp_path, name, codec, sizes, shards) -> int:
    """A worker's cross-site bytes: for every sync (its fragment from the sync rows), each
    of its streams' payload (``shards[f]``: the values of each) and handshake with every peer."""
    c = get_codec(codec)
    syncs = [x["fragment"] for x in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
             if x["kind"] == "sync"]
    return sum(make_plan(n, W, c).bytes_sent + (W - 1) * HANDSHAKE_NBYTES for f in syncs for n in shards[f])


def check_site_run(tmp_path, name, ref_dir, ref_name, codec, parallel):
    """What every site run must show against its one-rank reference: the same tokens and
    syncs, the loss curve, θ_g the same bits on every rank of every site, a DDP site's
    ranks holding one replica, and the cross-site bytes exactly as the shards predict."""
    got, ref = summary(tmp_path, name), summary(ref_dir, ref_name)
    assert got["site"]["ranks"] == R and got["site"]["parallel"] == parallel
    assert got["tokens"] == ref["tokens"] and got["sync_events"] == ref["sync_events"]
    torch.testing.assert_close(train_losses(tmp_path, name), train_losses(ref_dir, ref_name), rtol=1e-4, atol=0)
    assert abs(got["final_eval_loss"] - ref["final_eval_loss"]) < 1e-3 * ref["final_eval_loss"]
    for rank in range(R):  # θ_g: the same bits on every site, rank by rank (DDP: whole; FSDP: each shard)
        a = state(tmp_path, name, 0, rank)["algo"]["anchors"]
        b = state(tmp_path, name, 1, rank)["algo"]["anchors"]
        assert all(torch.equal(x, y) for fx, fy in zip(a, b) for x, y in zip(fx, fy))
    sharded = parallel == "fsdp"
    if not sharded:  # a site's ranks hold one replica: the same parameters after every step
        m0, m1 = state(tmp_path, name, 0, 0)["model"], state(tmp_path, name, 0, 1)["model"]
        assert all(torch.equal(m0[k], m1[k]) for k in m0)
    sizes = [sum(a.numel() for a in f) for f in theta_g(ref_dir, ref_name, 0, site=False)]
    align = get_codec(codec).alignment
    shards = [local_sizes(tmp_path, name, f) if sharded else [shard_numel(sizes[f], R, align)] * R
              for f in range(len(sizes))]
    assert ref["bytes_sent_per_worker"] == [expected_bytes(tmp_path, name, codec, sizes, [[n] for n in sizes])] * W
    assert got["bytes_sent_per_worker"] == [expected_bytes(tmp_path, name, codec, sizes, shards)] * W
    assert (got["site"]["site_bytes_per_worker"] == [0] * W) if sharded else all(b > 0 for b in got["site"]["site_bytes_per_worker"])
    return got


def test_fsdp_sites_of_two_ranks_train_as_workers_of_twice_the_batch(runs):
    """fp32 on the wire: θ_g within float rounding of the one-rank run's; FSDP gathers nothing."""
    tmp, _ = runs
    check_site_run(tmp, "fsdp", tmp, "ref-fp32", "fp32", "fsdp")
    for w in range(W):
        torch.testing.assert_close(flat(theta_g(tmp, "fsdp", w, sharded=True)),
                                   flat(theta_g(tmp, "ref-fp32", 0, site=False)), rtol=0, atol=1e-5)


def test_ddp_sites_with_fp4_keep_the_codec_blocks_of_one_rank(runs, tmp_path):
    """Streaming DiLoCo, P = 2, τ = 1, fp4: DDP's shards are cut at codec blocks, so the
    payloads hold the same blocks as one rank's; θ_g differs by float noise, and by one
    rounding step where such noise moved a value across a threshold."""
    tmp, _ = runs
    r = torchrun(tmp_path, "ddp", "--algo.codec=fp4-e3m0", "--site.parallel=ddp")
    assert r.returncode == 0, r.stderr[-3000:]
    check_site_run(tmp_path, "ddp", tmp, "ref-fp4-e3m0", "fp4-e3m0", "ddp")
    d = (flat(theta_g(tmp_path, "ddp", 0)) - flat(theta_g(tmp, "ref-fp4-e3m0", 0, site=False))).abs()
    assert float(d.mean()) < 1e-6 and float((d > 1e-5).float().mean()) < 0.01


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


def test_a_site_run_resumed_from_its_checkpoint_equals_the_uninterrupted_run(runs, tmp_path):
    """FSDP (every rank's shards in its own file): killed after step 8, resumed from the
    checkpoint of step 6, it ends where the uninterrupted run ends, bit for bit."""
    full_dir, _ = runs
    cut = torchrun(tmp_path, "cut", "--algo.codec=fp32", "--site.parallel=fsdp", env={"FARSYNC_DIE_AT": "9"})
    assert cut.returncode != 0 and ckpt.latest_step(str(tmp_path / "cut")) == 6
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={W * R}",
                              "-m", "farsync", "train", "--resume", str(tmp_path / "cut")],
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for w in range(W):
        for rank in range(R):
            a, b = state(full_dir, "fsdp", w, rank)["algo"], state(tmp_path, "cut", w, rank)["algo"]
            assert all(torch.equal(x, y) for fx, fy in zip(a["anchors"], b["anchors"]) for x, y in zip(fx, fy))
    assert summary(tmp_path, "cut")["final_eval_loss"] == summary(full_dir, "fsdp")["final_eval_loss"]
    assert train_losses(tmp_path, "cut") == train_losses(full_dir, "fsdp")
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
