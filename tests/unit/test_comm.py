"""The exchange seam (farsync.comm.base.ExchangeRequest): per-worker weights, round
identity and membership, on the in-process backend."""

from __future__ import annotations

import pytest
import torch

from farsync.codecs import get_codec
from farsync.comm import ExchangeRequest, InProcessGroup

FP32 = get_codec("fp32")


def test_weights_give_a_weighted_mean():
    comms = InProcessGroup(2).communicators()
    bufs = [torch.full((5,), 1.0), torch.full((5,), 4.0)]
    works = [c.exchange(ExchangeRequest(b, FP32, weight=w, round=("r", 1))) for c, b, w in zip(comms, bufs, (1.0, 3.0))]
    for w in works:
        res = w.wait()
        torch.testing.assert_close(res.mean, torch.full((5,), (1.0 + 3 * 4.0) / 4))
        assert res.weights == (1.0, 3.0)


def test_workers_in_different_rounds_are_refused():
    a, b = InProcessGroup(2).communicators()
    a.exchange(ExchangeRequest(torch.zeros(4), FP32, round=("fragment", 0, 10)))
    with pytest.raises(RuntimeError, match=r"rank 1 is in round \('fragment', 1, 10\)"):
        b.exchange(ExchangeRequest(torch.zeros(4), FP32, round=("fragment", 1, 10)))



def test_sparse_codecs_travel_by_all_gather_and_refuse_reduce_scatter():
    from farsync.codecs import get_codec
    from farsync.comm.exchange import make_plan
    from farsync.train.config import ConfigError, build_config

    codec = get_codec("topk64-int2")
    assert make_plan(100_000, 4, codec, "auto").method == "all-gather"  # reduce-scatter would send fewer bytes
    assert make_plan(100_000, 4, get_codec("fp4-e3m0"), "auto").method == "reduce-scatter"
    with pytest.raises(ValueError, match="exchange=reduce-scatter cannot carry the sparse codec 'topk64-int2'"):
        make_plan(100_000, 4, codec, "reduce-scatter")
    with pytest.raises(ConfigError, match="algo.exchange=reduce-scatter cannot carry the sparse codec"):
        build_config(None, ["--algo.codec=topk64-int2", "--algo.exchange=reduce-scatter"])
    assert build_config(None, ["--algo.codec=topk64-int2", "--algo.error_feedback=true"]).algo.codec == "topk64-int2"
