"""Unequal and unreliable workers, in-process: token-weighted means, partial
participation, receivers that leave out a faulty worker's pseudo-gradient, skipped rounds.
(The same arithmetic over real gloo processes: tests/distributed/test_gloo.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from toy import batch, loss_fn, make_model

from farsync.algorithms import make_strategy, step_in_lockstep
from farsync.codecs import get_codec
from farsync.comm import InProcessGroup
from farsync.comm import exchange as ex
from farsync.comm.base import ExchangeRequest
from farsync.comm.faults import FaultyCommunicator, parse_fault


def workers(m, comms=None, **kw):
    group = InProcessGroup(m)
    comms = comms or group.communicators()
    models, algos = [], []
    for r in range(m):
        model = make_model(0)
        models.append(model)
        algos.append(make_strategy(model, torch.optim.SGD(model.parameters(), lr=0.05), comms(group)[r]
                                   if callable(comms) else comms[r], **kw))
    return models, algos


def train(models, algos, steps, tokens=None, active=None):
    for s in range(steps):
        on = active(s) if active else [True] * len(models)
        for r, model in enumerate(models):
            if on[r]:
                loss_fn(model, *batch(r, s)).backward()
        step_in_lockstep(algos, tokens=tokens, active=on)
        for a in algos:
            a.inner_optimizer.zero_grad()


def exchange_all(m, bufs, weights, codec="fp32", method="auto", agg=ex.PLAIN):
    group = InProcessGroup(m)
    works = [c.exchange(ExchangeRequest(b, get_codec(codec), w, None, method, aggregation=agg))
             for c, b, w in zip(group.communicators(), bufs, weights)]
    return [w.wait() for w in works]


@pytest.mark.parametrize("method", ["all-gather", "reduce-scatter"])
def test_token_weighted_mean_is_the_hand_computed_one(method):
    bufs = [torch.full((10,), 1.0), torch.full((10,), 2.0), torch.full((10,), 4.0)]
    res = exchange_all(3, bufs, [100.0, 300.0, 600.0], method=method)
    expect = (100 * 1.0 + 300 * 2.0 + 600 * 4.0) / 1000  # 3.1
    for r in res:
        assert torch.allclose(r.mean, torch.full((10,), expect), rtol=0, atol=1e-6)
        assert r.kept == (0, 1, 2)


def test_equal_token_counts_give_the_plain_mean_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    bufs = [torch.randn(1000, generator=g) for _ in range(3)]
    plain = exchange_all(3, bufs, [1.0] * 3)[0].mean
    tokens = exchange_all(3, bufs, [4096.0] * 3)[0].mean
    assert torch.equal(plain, tokens)


def test_token_weighting_equal_batches_reproduces_unweighted_training():
    kw = dict(mode="streaming", inner_steps=4, fragments=2, sync_delay=1, codec="int8")
    m1, a1 = workers(3, **kw, token_weighting=False)
    m2, a2 = workers(3, **kw)
    train(m1, a1, 12)
    train(m2, a2, 12, tokens=[512] * 3)
    for x, y in zip(m1, m2):
        for p, q in zip(x.parameters(), y.parameters()):
            assert torch.equal(p, q)
    assert a2[0].stats.tokens == 12 * 512


@pytest.mark.parametrize("m,method,fault", [(2, "all-gather", "nan"), (3, "reduce-scatter", "nan"),
                                             (2, "all-gather", "scale:1000"), (3, "reduce-scatter", "scale:1000"),
                                             (4, "reduce-scatter", "scale:1000")])
def test_a_faulty_contribution_is_left_out_as_if_it_never_came(m, method, fault):
    kind, factor = parse_fault(fault)
    bad_round = ("fragment", 0, 4)  # fragment 0's first sync, after step 4
    kw = dict(mode="streaming", inner_steps=4, fragments=2, codec="fp4-e3m0", exchange=method)

    def faulty(group):
        comms = group.communicators()
        comms[1] = FaultyCommunicator(comms[1], kind, factor, rounds={bad_round})
        return comms

    m_bad, a_bad = workers(m, faulty, **kw)
    train(m_bad, a_bad, 10)
    # the same run in which worker 1 never contributed to that round
    m_ref, a_ref = workers(m, **kw)
    a_ref[1].participates = lambda f, rnd, rank=None: not (f == 0 and rnd == 1)
    train(m_ref, a_ref, 10)
    for x, y in zip(m_bad, m_ref):
        for p, q in zip(x.parameters(), y.parameters()):
            assert torch.equal(p, q)
    for a in a_bad:  # every worker saw the same decision, named worker, fragment and round
        assert len(a.exclusions) == 1
        e = a.exclusions[0]
        assert (e["worker"], e["fragment"], e["round"], e["step"]) == (1, 0, 1, 4)
        assert ("non-finite" in e["why"]) if kind == "nan" else ("median" in e["why"])
    assert a_bad[1].stats.rounds_excluded == 1 and a_bad[0].stats.rounds_excluded == 0
    assert a_bad[0].stats.rounds_joined == a_bad[1].stats.rounds_joined + 1


def test_too_few_contributions_skip_the_round_and_keep_theta_g():
    agg = ex.Aggregation(min_contributions=2)
    kw = dict(mode="diloco", inner_steps=3, aggregation=agg)

    def faulty(group):
        comms = group.communicators()
        comms[0] = FaultyCommunicator(comms[0], "nan", rounds={("fragment", 0, 3)})
        return comms

    models, algos = workers(2, faulty, **kw)
    before = [a.clone() for a in algos[0].anchors[0]]
    train(models, algos, 3)
    for a in algos:
        assert a.stats.rounds_skipped == 1 and a.skipped_rounds[0]["kept"] == [1]
        assert all(torch.equal(x, y) for x, y in zip(a.anchors[0], before))  # θ_g unchanged
    for model in models:  # every replica is back at θ_g
        for p, b in zip(model.parameters(), before):
            assert torch.equal(p, b)


def test_partial_participation_samples_the_same_workers_everywhere_and_skips_their_payload():
    models, algos = workers(4, mode="streaming", inner_steps=4, fragments=2, participation=2, participation_seed=7)
    train(models, algos, 16)  # fragment 0: rounds 1-4 at 4, 8, 12, 16; fragment 1: rounds 1-3
    picks = {(f, r): [w for w in range(4) if algos[0].participates(f, r, w)] for f in (0, 1) for r in (1, 2, 3, 4)}
    assert all(len(p) == 2 for p in picks.values())
    assert len({tuple(p) for p in picks.values()}) > 1  # the sample changes between rounds
    for a in algos:  # every worker draws the same sample for every worker
        assert all([w for w in range(4) if a.participates(f, r, w)] == p for (f, r), p in picks.items())
    joined = [a.stats.rounds_joined for a in algos]
    sat_out = [a.stats.rounds_sat_out for a in algos]
    assert sum(joined) == 2 * algos[0].stats.sync_events  # K = 2 contributions per round
    assert [j + s for j, s in zip(joined, sat_out)] == [algos[0].stats.sync_events] * 4
    # a worker sitting a round out sends no payload (it still receives the mean)
    assert len({a.stats.bytes_sent for a in algos}) > 1
    syncs = [e for e in algos[0].drain_events() if e["kind"] == "sync"]  # who contributed to each round, as every worker saw it
    assert len(syncs) == algos[0].stats.sync_events and algos[0].drain_events() == []
    for sync in syncs:
        assert sync["kept"] == picks[(sync["fragment"], sync["round"])]
        assert sorted(sync["kept"] + sync["sat_out"]) == [0, 1, 2, 3]


def test_idle_steps_send_what_was_trained_weighted_by_it():
    """Per-worker step counts: worker 1 trains every other step, so its pseudo-gradient
    weighs half of worker 0's (steps as tokens)."""
    models, algos = workers(2, mode="diloco", inner_steps=4)
    sent = []
    orig = algos[0].comm.exchange

    def spy(req):
        sent.append(req.weight)
        return orig(req)

    algos[0].comm.exchange = spy
    w1 = []
    orig1 = algos[1].comm.exchange
    algos[1].comm.exchange = lambda req: (w1.append(req.weight), orig1(req))[1]
    train(models, algos, 8, active=lambda s: [True, s % 2 == 0])
    assert sent == [4.0, 4.0] and w1 == [2.0, 2.0]
    assert algos[1].stats.inner_steps == 4 and algos[1].stats.idle_steps == 4
    assert algos[0].stats.inner_steps == 8
    # one process per worker: step() and idle() instead of the lock-step driver
    solo = workers(1, mode="diloco", inner_steps=4)[1][0]
    for _ in range(3):
        solo.idle()
    loss_fn(solo.model, *batch(0, 0)).backward()
    solo.step(tokens=128)
    assert solo.stats.idle_steps == 3 and solo.stats.tokens == 128 and solo.stats.rounds_joined == 1


@pytest.mark.parametrize("method", ["all-gather", "reduce-scatter"])
def test_the_norm_rule_is_per_unit_of_weight(method):
    """Two workers trained 20 steps, two trained 1: their pseudo-gradients differ ~20× in
    norm and none is an outlier; one 1000× too large for its weight is."""
    g = torch.Generator().manual_seed(2)
    step = [torch.randn(256, generator=g) * 0.01 for _ in range(4)]
    bufs = [step[0] * 20, step[1] * 20, step[2], step[3]]
    res = exchange_all(4, bufs, [20.0, 20.0, 1.0, 1.0], method=method, agg=ex.Aggregation())
    assert res[0].kept == (0, 1, 2, 3) and not res[0].excluded
    bufs[2] = step[2] * 1000
    res = exchange_all(4, bufs, [20.0, 20.0, 1.0, 1.0], method=method, agg=ex.Aggregation())
    assert res[0].kept == (0, 1, 3) and [r for r, _ in res[0].excluded] == [2]


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_coordinate_wise_rules_resist_one_wild_worker(rule):
    g = torch.Generator().manual_seed(1)
    good = [torch.randn(64, generator=g) * 0.01 + 1.0 for _ in range(4)]
    bad = torch.full((64,), 50.0)
    agg = ex.Aggregation(rule=rule, outlier_factor=None, trim=0.2)
    for method in ("all-gather", "reduce-scatter"):
        res = exchange_all(5, good + [bad], [1.0] * 5, method=method, agg=agg)
        assert (res[0].mean - 1.0).abs().max() < 0.05  # the plain mean would be ~10.8
        assert all(torch.equal(r.mean, res[0].mean) for r in res)
    x = torch.stack(good + [bad]).sort(dim=0).values
    expect = x[2] if rule == "median" else x[1:4].mean(0)  # ⌊0.2·5⌋ = 1 cut from each end
    got = exchange_all(5, good + [bad], [1.0] * 5, method="all-gather", agg=agg)[0].mean
    assert torch.equal(got, expect)


def test_bad_aggregation_settings_are_named():
    with pytest.raises(ValueError, match="aggregation rule must be one of"):
        ex.Aggregation(rule="mode")
    with pytest.raises(ValueError, match="outlier_factor must be > 1"):
        ex.Aggregation(outlier_factor=0.5)
    with pytest.raises(ValueError, match="participation"):
        workers(2, mode="diloco", inner_steps=2, participation=3)
    with pytest.raises(ValueError, match="fault must be nan, scale:FACTOR or leave:STEP"):
        parse_fault("zero")
    assert parse_fault("scale:1e3") == ("scale", 1000.0) and math.isnan(parse_fault("nan")[1])


@pytest.mark.parametrize("rule", ["mean", "median"])
@pytest.mark.parametrize("method", ["all-gather", "reduce-scatter"])
def test_reused_decode_buffers_never_leak_into_a_result(method, rule):
    """Exchanges decode into buffers reused from one exchange to the next: a result
    held from an earlier exchange must not change when a later one reuses them."""
    group = InProcessGroup(3)
    agg = ex.Aggregation(rule=rule)

    def one(fill):
        works = [c.exchange(ExchangeRequest(torch.full((96,), fill + r), get_codec("int8"), 1.0, None, method,
                                            aggregation=agg)) for r, c in enumerate(group.communicators())]
        return [w.wait().mean for w in works]

    first = one(1.0)
    kept = [m.clone() for m in first]
    one(50.0)
    assert all(torch.equal(a, b) for a, b in zip(first, kept))


@pytest.mark.parametrize("rule", ["mean", "median", "trimmed-mean"])
@pytest.mark.parametrize("kept", [(0,), (0, 1), (0, 1, 2)])
def test_combine_never_aliases_the_decoded_inputs(rule, kept):
    decoded = {r: torch.full((8,), float(r + 1)) for r in range(3)}
    out = ex.combine(ex.Aggregation(rule=rule), decoded, [1.0, 1.0, 1.0], kept)
    before = out.clone()
    for x in decoded.values():
        x.fill_(99.0)  # the next exchange decodes into the same buffers
    assert torch.equal(out, before)
