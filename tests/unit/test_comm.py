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

