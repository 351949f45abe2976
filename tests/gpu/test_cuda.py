"""On a CUDA device (skipped elsewhere; run by benchmarks/gpu/run.sh): the training loop,
offloaded outer state and gloo over a model on the GPU. The codecs' CUDA payloads are
checked against the CPU's in tests/unit/test_codecs.py and test_sparse_codecs.py."""

from __future__ import annotations

import math
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from farsync.algorithms import DiLoCo, step_in_lockstep  # noqa: E402
from farsync.comm import InProcessGroup  # noqa: E402
from toy import batch, loss_fn, make_model  # noqa: E402

KW = dict(mode="streaming", inner_steps=6, fragments=2, sync_delay=1, codec="fp4-e3m0")


def _workers(m, comms, **kw):
    models, algos = [], []
    for r in range(m):
        model = make_model(0).cuda()
        algos.append(DiLoCo(model, torch.optim.AdamW(model.parameters(), lr=1e-2), comms[r], **KW, **kw))
        models.append(model)
    return models, algos


def _train(models, algos, steps, ranks=None):
    for s in range(steps):
        for r, model in zip(ranks or range(len(models)), models):
            x, y = batch(r, s)
            loss_fn(model, x.cuda(), y.cuda()).backward()
        step_in_lockstep(algos)
        for a in algos:
            a.inner_optimizer.zero_grad()
    for a in algos:
        a.finish()


def _theta_g(algo) -> torch.Tensor:
    return torch.cat([a.reshape(-1).cpu() for fa in algo.anchors for a in fa])


def test_offload_keeps_outer_state_in_pinned_host_memory():
    g = InProcessGroup(2)
    base_models, base = _workers(2, g.communicators())
    _train(base_models, base, 20)
    g2 = InProcessGroup(2)
    models, algos = _workers(2, g2.communicators(), offload=True)
    _train(models, algos, 20)
    for a in (x for fa in algos[0].anchors for x in fa):
        assert a.device.type == "cpu" and a.is_pinned()
    for o in algos[0].outer_optimizers:
        assert all(v.device.type == "cpu" for st in o.state.values() for v in st.values() if torch.is_tensor(v))
    assert all(p.device.type == "cuda" for p in models[0].parameters())
    # the same run: only the outer step's arithmetic moved to the CPU
    torch.testing.assert_close(_theta_g(algos[0]), _theta_g(base[0]), atol=1e-5, rtol=0)
    assert torch.equal(_theta_g(algos[0]), _theta_g(algos[1]))


def _gloo_worker(rank: int, path: str, out: str) -> None:
    import torch.distributed as dist

    from farsync.comm.distributed import TorchDistributedCommunicator

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    comm = TorchDistributedCommunicator()
    models, algos = _workers(1, [comm])
    _train(models, algos, 20, ranks=[rank])
    torch.save({"theta_g": _theta_g(algos[0]), "bytes": algos[0].stats.bytes_sent}, f"{out}.{rank}")
    comm.close()
    dist.destroy_process_group()


def test_gloo_exchanges_a_models_pseudo_gradients_from_the_gpu(tmp_path):
    """Two processes on the one GPU, gloo between them: the buffers go through pinned host
    memory, and both end with the θ_g of the in-process run of the same two workers."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "res")
    mp.start_processes(_gloo_worker, args=(str(tmp_path / "store"), out), nprocs=2, start_method="spawn")
    got = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    assert torch.equal(got[0]["theta_g"], got[1]["theta_g"])
    g = InProcessGroup(2)
    models, algos = _workers(2, g.communicators())
    _train(models, algos, 20)
    torch.testing.assert_close(got[0]["theta_g"], _theta_g(algos[0]), atol=1e-5, rtol=0)
    assert got[0]["bytes"] == algos[0].stats.bytes_sent > 0


def test_farsync_train_on_cuda(tmp_path):
    """farsync train on the GPU, Streaming with overlap and fp4; with algo.offload the same
    run up to the outer step's arithmetic on the CPU."""
    from farsync.train import train
    from farsync.train.config import build_config

    args = ["--model.size=nano", "--model.seq_len=64", "--data.vocab_size=512", "--algo.workers=2",
            "--algo.mode=streaming", "--algo.inner_steps=10", "--algo.fragments=2", "--algo.sync_delay=1",
            "--algo.codec=fp4-e3m0", "--train.steps=40", "--train.batch_size=8", "--train.eval_every=20",
            "--train.device=cuda", "--train.progress=false", f"--train.run_dir={tmp_path}"]
    s = train(build_config(None, args + ["--train.name=gpu"]))
    assert math.isfinite(s["final_eval_loss"]) and s["final_eval_loss"] < math.log(512)
    s2 = train(build_config(None, args + ["--train.name=gpu-offload", "--algo.offload=true"]))
    assert abs(s2["final_eval_loss"] - s["final_eval_loss"]) < 1e-3 * s["final_eval_loss"]
