"""The algorithm contract (the invariants of the README's "Invariants" section): equivalences, schedule, exact replicas,
resume, and errors — on the in-process backend with a toy model."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from farsync.algorithms import DiLoCo, build_fragments, make_strategy, step_in_lockstep
from farsync.algorithms.feedback import compensate
from farsync.schedule import sync_steps
from farsync.comm import InProcessGroup
from toy import batch, loss_fn, make_model, params

ATOL = 1e-6


def make_workers(m, *, inner="sgd", lr=0.05, seed=0, delay_s=0.0, **kw):
    group = InProcessGroup(m, delay_s=delay_s)
    models, algos = [], []
    for r in range(m):
        model = make_model(seed)
        if inner == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=lr)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
        models.append(model)
        algos.append(make_strategy(model, opt, group.communicator(r), **kw))
    return models, algos


def run(models, algos, steps, start=0, check=None):
    for s in range(start, start + steps):
        for r, (model, algo) in enumerate(zip(models, algos)):
            x, y = batch(r, s)
            loss_fn(model, x, y).backward()
        step_in_lockstep(algos)
        for a in algos:
            a.inner_optimizer.zero_grad()
        if check is not None:
            check(s + 1, algos)


def plain_sgd_on_union(m, steps, lr, seed=0):
    """Single-process SGD on the union of the M workers' batches."""
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for s in range(steps):
        xs, ys = zip(*(batch(r, s) for r in range(m)))
        loss_fn(model, torch.cat(xs), torch.cat(ys)).backward()
        opt.step()
        opt.zero_grad()
    return params(model)


def resumed_copy(models, algos, m, kw):
    """Fresh workers loaded from the checkpoint state of ``models``/``algos``."""
    saved = [(copy.deepcopy(x.state_dict()), copy.deepcopy(a.inner_optimizer.state_dict()), copy.deepcopy(a.state_dict()))
             for x, a in zip(models, algos)]
    models2, algos2 = make_workers(m, **kw)
    for x, a, (ms, os_, as_) in zip(models2, algos2, saved):
        x.load_state_dict(ms)
        a.inner_optimizer.load_state_dict(os_)
        a.load_state_dict(as_)
    return models2, algos2


def assert_bit_identical(models_a, models_b):
    for a, b in zip(models_a, models_b):
        for x, y in zip(params(a), params(b)):
            assert torch.equal(x, y)


def assert_close(a, b, atol=ATOL):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


# ---- equivalences ----------------------------------------------------------------------

@pytest.mark.parametrize("m", [2, 4])
def test_dp_mode_equals_sgd_on_union_batch(m):
    models, algos = make_workers(m, mode="dp", lr=0.1)
    run(models, algos, 6)
    ref = plain_sgd_on_union(m, 6, 0.1)
    for model in models:
        assert_close(params(model), ref)
    assert algos[0].stats.sync_events == 6


@pytest.mark.parametrize("m", [2, 4])
def test_diloco_h1_outer_sgd_lr1_equals_dp(m):
    models, algos = make_workers(m, mode="diloco", inner_steps=1, outer_lr=1.0, outer_momentum=0.0, lr=0.1)
    run(models, algos, 6)
    ref = plain_sgd_on_union(m, 6, 0.1)
    for model in models:
        assert_close(params(model), ref)


def test_single_worker_outer_sgd_lr1_equals_plain_training():
    models, algos = make_workers(1, inner="adamw", mode="diloco", inner_steps=5, outer_lr=1.0, outer_momentum=0.0, lr=1e-2)
    run(models, algos, 15)
    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for s in range(15):
        x, y = batch(0, s)
        loss_fn(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    assert_close(params(models[0]), params(model))
    assert algos[0].stats.bytes_sent == 0  # nothing travels with M = 1


def reference_diloco(m, steps, H, lr, outer_lr=0.7, momentum=0.9):
    """DiLoCo written straight from the paper, with no farsync code."""
    workers = [make_model(0) for _ in range(m)]
    inner = [torch.optim.AdamW(w.parameters(), lr=lr, weight_decay=0.1) for w in workers]
    glob = make_model(0)
    outer = torch.optim.SGD(glob.parameters(), lr=outer_lr, momentum=momentum, nesterov=True)
    for s in range(steps):
        for r, (w, o) in enumerate(zip(workers, inner)):
            x, y = batch(r, s)
            loss_fn(w, x, y).backward()
            o.step()
            o.zero_grad()
        if (s + 1) % H == 0:
            with torch.no_grad():
                for gp, *wps in zip(glob.parameters(), *(w.parameters() for w in workers)):
                    gp.grad = torch.stack([gp - wp for wp in wps]).mean(0)
            outer.step()
            outer.zero_grad()
            with torch.no_grad():
                for w in workers:
                    for wp, gp in zip(w.parameters(), glob.parameters()):
                        wp.copy_(gp)
    return [params(w) for w in workers]


@pytest.mark.parametrize("mode,extra", [("diloco", {}), ("streaming", {"fragments": 1, "sync_delay": 0, "mixing": 0.0})])
def test_diloco_and_streaming_p1_tau0_match_paper_reference(mode, extra):
    """Also covers `fp32 codec ≡ no codec`: the reference averages with torch.mean."""
    models, algos = make_workers(3, inner="adamw", lr=1e-2, mode=mode, inner_steps=4, codec="fp32", **extra)
    run(models, algos, 12)
    ref = reference_diloco(3, 12, 4, 1e-2)
    for model, rp in zip(models, ref):
        assert_close(params(model), rp)


def test_streaming_p1_tau0_is_bit_identical_to_diloco():
    a_models, a_algos = make_workers(2, inner="adamw", lr=1e-2, mode="diloco", inner_steps=3)
    b_models, b_algos = make_workers(2, inner="adamw", lr=1e-2, mode="streaming", inner_steps=3, fragments=1)
    run(a_models, a_algos, 9)
    run(b_models, b_algos, 9)
    for ma, mb in zip(a_models, b_models):
        for x, y in zip(params(ma), params(mb)):
            assert torch.equal(x, y)


# ---- replicas, schedule ------------------------------------------------------------------

@pytest.mark.parametrize("codec", ["fp32", "bf16", "int8", "fp4-e3m0", "fp4-e2m1"])
def test_replicas_bit_identical_after_sync_with_alpha0(codec):
    m = 3
    models, algos = make_workers(
        m, inner="adamw", lr=1e-2, mode="streaming", inner_steps=4, fragments=2, sync_delay=1,
        mixing=0.0, codec=codec, stochastic_rounding=codec.startswith("fp4"),
    )
    landed = []

    def check(step, algos):
        for f in range(2):
            sent = [s for s in sync_steps(4, 2, f, step) if s + 1 == step]
            if sent:
                landed.append(f)
                vals = [[p.detach().clone() for p in a.fragments[f].params] for a in algos]
                for other in vals[1:]:
                    for x, y in zip(vals[0], other):
                        assert torch.equal(x, y), f"fragment {f} differs across replicas at step {step}"

    run(models, algos, 13, check=check)
    assert landed == [0, 1, 0, 1, 0]  # syncs land at 5, 7, 9, 11, 13


def test_schedule_h100_p4_matches_paper():
    model = make_model(0, n_blocks=4)
    group = InProcessGroup(1)
    algo = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.01), group.communicator(0),
                  mode="streaming", inner_steps=100, fragments=4, sync_delay=3)
    assert algo.offsets == [0, 25, 50, 75]
    sends = {s: algo.due_to_send(s) for s in range(1, 401)}
    for p in range(4):
        assert [s for s, fs in sends.items() if p in fs] == [100 + 25 * p, 200 + 25 * p, 300 + 25 * p] + ([400] if p == 0 else [])
    assert sync_steps(100, 2, 1, 300) == [150, 250]  # the Streaming DiLoCo paper's example (H=100, P=2)


def test_at_most_one_fragment_in_flight():
    peak = []
    models, algos = make_workers(2, mode="streaming", inner_steps=8, fragments=4, sync_delay=1)
    orig = algos[0].inner_step

    def watched():
        orig()  # the moment with most in flight: after sends, before landings
        peak.append((algos[0].step_count, algos[0].in_flight))

    algos[0].inner_step = watched
    run(models, algos, 40)
    sends = {s: algos[0].due_to_send(s) for s in range(1, 41)}  # one fragment every 2 steps from 8
    for step, flying in peak:
        expected = sends[step] or (sends[step - 1] if step > 1 else [])  # sent now, or τ = 1 step ago
        assert flying == expected, f"step {step}: in flight {flying}, expected {expected}"


def test_fragments_strided_sequential_and_placement():
    model = make_model(0, n_blocks=6)
    strided = build_fragments(model, 3, "strided")
    seq = build_fragments(model, 3, "sequential")
    blocks_of = lambda fr: sorted({int(n.split(".")[1]) for n in fr.names if n.startswith("blocks.")})
    assert [blocks_of(f) for f in strided] == [[0, 3], [1, 4], [2, 5]]
    assert [blocks_of(f) for f in seq] == [[0, 1], [2, 3], [4, 5]]
    # inputs go with block 0's fragment, outputs with the last block's
    assert "inp.weight" in strided[0].names and "head.weight" in strided[2].names and "norm.weight" in strided[2].names
    assert "inp.weight" in seq[0].names and "head.weight" in seq[2].names
    for frs in (strided, seq):
        names = [n for f in frs for n in f.names]
        assert sorted(names) == sorted(n for n, _ in model.named_parameters())


def test_explicit_fragments_by_name_and_module():
    model = make_model(0, n_blocks=2)
    frs = build_fragments(model, fragment_groups=[["inp", model.blocks[0]], ["blocks.1", "norm", "head"]])
    assert frs[0].names == ["inp.weight", "inp.bias", "blocks.0.weight", "blocks.0.bias"]
    with pytest.raises(ValueError, match="'head.weight' is in no fragment"):
        build_fragments(model, fragment_groups=[["inp", "blocks.*"], ["norm"]])
    with pytest.raises(ValueError, match="'blocks.0.weight' is in two fragments"):
        build_fragments(model, fragment_groups=[["inp", "blocks.*"], ["blocks.0", "norm", "head"]])


# ---- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    ({"inner_steps": 100, "fragments": 4, "sync_delay": 25}, r"sync_delay \(τ\) = 25: must be < inner_steps/fragments = 100/4"),
    ({"mixing": 1.5}, r"mixing \(α\) = 1.5: must be in \[0, 1\]"),
    ({"mixing": -0.1}, r"mixing \(α\) = -0.1: must be in \[0, 1\]"),
    ({"fragments": 5}, r"fragments \(P\) = 5: is more than the model's 4 blocks"),
    ({"codec": "fp3"}, r"unknown codec 'fp3'"),
    ({"workers": 3}, r"workers \(M\) = 3: does not match the communicator's 2 workers"),
    ({"mode": "localsgd"}, r"mode must be one of dp, diloco, streaming \(got 'localsgd'\)"),
    ({"mode": "diloco", "fragments": 2}, r"fragments \(P\) = 2: mode 'diloco' syncs all parameters at once: must be 1"),
    ({"inner_steps": 0}, r"inner_steps \(H\) = 0: must be an integer >= 1"),
    ({"exchange": "ring"}, r"exchange must be one of auto, reduce-scatter, all-gather \(got 'ring'\)"),
    ({"mode": "dp", "exchange": "ring"}, r"exchange must be one of .* \(got 'ring'\)"),
    ({"mode": "dp", "workers": 3}, r"workers \(M\) = 3: does not match"),
])
def test_bad_arguments_name_the_argument(kw, match):
    model = make_model(0)
    group = InProcessGroup(2)
    with pytest.raises(ValueError, match=match):
        make_strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), group.communicator(0), **kw)


# ---- resume -------------------------------------------------------------------------------

def test_resume_with_fragment_in_flight_is_exact():
    kw = dict(inner="adamw", lr=1e-2, mode="streaming", inner_steps=6, fragments=2, sync_delay=2,
              codec="fp4-e3m0", stochastic_rounding=True)
    full_models, full_algos = make_workers(2, **kw)
    run(full_models, full_algos, 20)

    models, algos = make_workers(2, **kw)
    run(models, algos, 10)  # fragment 1 was sent at step 9 and lands at 11: in flight now
    assert algos[0].in_flight == [1]
    models2, algos2 = resumed_copy(models, algos, 2, kw)
    run(models2, algos2, 10, start=10)
    assert_bit_identical(full_models, models2)
    assert full_algos[0].stats.bytes_sent == algos2[0].stats.bytes_sent


# ---- accounting and overlap ---------------------------------------------------------------

def test_bytes_and_events_are_counted_exactly():
    models, algos = make_workers(4, mode="streaming", inner_steps=4, fragments=2, codec="fp32", exchange="reduce-scatter")
    run(models, algos, 8)  # fragment 0 at 4, 8; fragment 1 at 6
    st = algos[0].stats
    assert st.sync_events == 3
    sizes = [f.numel for f in algos[0].fragments]
    per = [2 * 3 * 4 * math.ceil(n / 4) for n in sizes]  # 2(M−1) shards of ⌈N/M⌉ fp32 values
    assert st.bytes_sent == 2 * per[0] + per[1]
    # control: the weight and the exchange's tag (8 B each) to 3 peers, and the shard's statistics of 4
    # senders (16 B each) to 3 peers
    assert st.peak_event_bytes == max(per) + 3 * 16 + 3 * 4 * 16
    assert st.dp_equivalent_bytes == 8 * round(2 * 3 / 4 * 4 * sum(sizes))


def _blocked(sync_delay, compute_s=0.08, delay_s=0.05):
    import time

    models, algos = make_workers(2, mode="streaming", inner_steps=4, fragments=2, sync_delay=sync_delay,
                                 mixing=0.5, delay_s=delay_s)

    def slow(step, algos):
        time.sleep(compute_s)  # stands in for the compute of the next step

    run(models, algos, 13, check=slow)  # sends after 4, 6, 8, 10, 12
    return algos[0].stats.blocked_seconds, algos[0].stats.sync_events


def test_overlap_hides_a_slow_exchange_and_tau0_does_not():
    blocked_overlap, events = _blocked(sync_delay=1)
    blocked_serial, events0 = _blocked(sync_delay=0)
    assert events == events0 == 5
    # τ = 0 waits out the whole 50 ms delay at every sync
    assert blocked_serial >= 0.8 * 5 * 0.05
    # τ = 1: the next step's 80 ms of compute covers the 50 ms exchange
    assert blocked_overlap < 0.2 * blocked_serial


# ---- error feedback -----------------------------------------------------------------------

def test_error_feedback_telescopes_and_sends_codec_values():
    """What was sent plus the residual left is exactly what should have been sent:
    Σ_k Q_k + e_K = Σ_k Δ_k, and every Q_k is a value the codec can represent."""
    from farsync.codecs import get_codec

    _, algos = make_workers(1, mode="diloco", inner_steps=2, codec="fp4-e3m0", error_feedback=True)
    a, codec = algos[0], get_codec("fp4-e3m0")
    n = sum(p.numel() for p in a.fragments[0].params)
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(n, generator=g) * 10 ** (k - 2) for k in range(4)]
    sent = []
    for d in deltas:
        e_before = torch.zeros(n) if a.residuals[0] is None else a.residuals[0].clone()
        out, a.residuals[0] = compensate(a.codec, d.clone(), a.residuals[0], a.error_feedback_decay)
        q = out - a.residuals[0]
        sent.append(q)
        pad = torch.nn.functional.pad(d + e_before, (0, -n % codec.alignment))
        torch.testing.assert_close(q, codec.decode(codec.encode(pad), pad.numel())[:n], rtol=0, atol=0)
    torch.testing.assert_close(sum(sent) + a.residuals[0], sum(deltas), rtol=1e-6, atol=1e-6)  # fp32 sums
    assert float(a.residuals[0].abs().max()) > 0  # fp4 drops something: the residual carries it


def test_error_feedback_decay_is_sparselocos_accumulator_and_a_round_sat_out_keeps_it():
    """e ← β·e + Δ, send Q(e) with a sparse codec, e ← e − Q(e); a round with nothing
    sent keeps all of β·e + Δ."""
    from farsync.codecs import get_codec

    codec = get_codec("topk16-int8")
    g = torch.Generator().manual_seed(0)
    n = 3 * codec.alignment + 5  # padded to whole chunks
    e, beta = None, 0.9
    ref = torch.zeros(n)
    for k in range(4):
        d = torch.randn(n, generator=g)
        sends = k != 2
        out, e = compensate(codec, d.clone(), e, beta, sends=sends)
        acc = beta * ref + d
        torch.testing.assert_close(out, acc, rtol=1e-6, atol=1e-6)  # what is sent is Q of the accumulator
        pad = torch.nn.functional.pad(acc, (0, -n % codec.alignment))
        q = codec.decode(codec.encode(pad), pad.numel())[:n] if sends else torch.zeros(n)
        torch.testing.assert_close(e, acc - q, rtol=1e-6, atol=1e-6)
        assert int((q != 0).sum()) <= 4 * codec.alignment // 16  # a sparse payload: 1 value in 16 of 4 chunks
        ref = e.clone()


def test_error_feedback_keeps_replicas_identical_and_resumes_exactly():
    kw = dict(inner="adamw", lr=1e-2, mode="streaming", inner_steps=6, fragments=2, sync_delay=2,
              mixing=0.0, codec="fp4-e3m0", error_feedback=True)
    full_models, full_algos = make_workers(3, **kw)
    run(full_models, full_algos, 20)
    # fragment 0 was sent at step 18 and landed at 20 (α = 0): every replica holds the same values
    vals = [[p.detach() for p in a.fragments[0].params] for a in full_algos]
    assert all(torch.equal(x, y) for other in vals[1:] for x, y in zip(vals[0], other))
    # without error feedback the run differs (the residuals do something)
    plain_models, _ = make_workers(3, **{**kw, "error_feedback": False})
    run(plain_models, _, 20)
    assert any(not torch.equal(x, y) for x, y in zip(params(full_models[0]), params(plain_models[0])))

    models, algos = make_workers(3, **kw)
    run(models, algos, 10)
    models2, algos2 = resumed_copy(models, algos, 3, kw)
    run(models2, algos2, 10, start=10)
    assert_bit_identical(full_models, models2)


def test_error_feedback_refuses_stochastic_rounding():
    with pytest.raises(ValueError, match="error_feedback"):
        make_workers(2, mode="diloco", codec="fp4-e3m0", error_feedback=True, stochastic_rounding=True)


# ---- end of training ----------------------------------------------------------------------

def _fragment_mean(algos, f):
    return [torch.stack([a.fragments[f].params[i].detach() for a in algos]).mean(0)
            for i in range(len(algos[0].fragments[f].params))]


def test_finish_syncs_the_last_inner_steps_of_every_fragment_as_a_plain_mean():
    # H = 4, P = 2: fragment 0 is sent at 4, 8; fragment 1 at 6, 10 — after 11 steps, fragment 0's
    # steps 9..11 and fragment 1's step 11 are synced only by finish()
    models, algos = make_workers(3, inner="adamw", lr=1e-2, mode="streaming", inner_steps=4, fragments=2)
    run(models, algos, 11)
    assert [a.last_sent(0) for a in algos] == [8, 8, 8] and algos[0].last_sent(1) == 10
    events = algos[0].stats.sync_events
    means = {f: _fragment_mean(algos, f) for f in range(2)}
    for a in algos:
        a.launch_final()
    for a in algos:
        a.finish()
    assert algos[0].stats.sync_events == events + 2  # both fragments trained since their last send
    for f in range(2):
        for a in algos:  # θ_g = the workers' mean (no outer step), and every replica holds it
            for anchor, p, m in zip(a.anchors[f], a.fragments[f].params, means[f]):
                torch.testing.assert_close(anchor, m, rtol=0, atol=1e-6)
                assert torch.equal(p.detach(), anchor)


def test_final_average_lands_the_last_scheduled_sync_without_momentum():
    def last_round(final_average):
        models, algos = make_workers(2, inner="adamw", lr=1e-2, mode="diloco", inner_steps=4, total_steps=8,
                                     final_average=final_average, outer_lr=0.7, outer_momentum=0.9)
        run(models, algos, 7)
        # step 8: the last inner step; its sync (sent after step total_steps) is the final one
        for r, model in enumerate(models):
            x, y = batch(r, 7)
            loss_fn(model, x, y).backward()
        for a in algos:
            a.launch(); a.wait(); a.inner_step()
        mean = _fragment_mean(algos, 0)
        for a in algos:
            a.complete()
        return algos, mean

    algos, mean = last_round(True)
    for anchor, m in zip(algos[0].anchors[0], mean):
        torch.testing.assert_close(anchor, m, rtol=0, atol=1e-6)
    events = algos[0].stats.sync_events
    for a in algos:
        a.finish()  # nothing trained since: nothing more to send
    assert algos[0].stats.sync_events == events
    nesterov, mean = last_round(False)
    assert any(not torch.allclose(a, m, atol=1e-4) for a, m in zip(nesterov[0].anchors[0], mean))


def test_a_joining_worker_adopts_the_shared_state_and_lands_the_sync_in_progress():
    """What an elastic worker does when it joins mid-run: it takes a live worker's
    shared_state() taken during a sync, lands that sync's result as the others do, and
    then holds their θ_g, outer optimizer state and schedule position exactly."""
    kw = dict(inner="adamw", lr=1e-2, mode="streaming", inner_steps=6, fragments=2, sync_delay=0, codec="fp4-e3m0")
    models, algos = make_workers(2, **kw)
    run(models, algos, 8)
    for r, (model, algo) in enumerate(zip(models, algos)):  # step 9: fragment 1 syncs after it
        x, y = batch(r, 8)
        loss_fn(model, x, y).backward()
    for a in algos:
        a.inner_step()
    assert algos[0].in_flight == [1]
    state = algos[0].shared_state()  # mid-sync, before the outer step
    work, sent, _ = algos[0]._pending[1]
    result = work.wait()
    for a in algos:
        a.complete()
    joiner_models, joiners = make_workers(2, **kw, seed=5)  # other initial weights: all are replaced
    joiner, joiner_model = joiners[0], joiner_models[0]
    run(joiner_models, joiners, 3)  # it trained a little on its own: dropped
    joiner.adopt(state, (1, sent, result))
    assert joiner.step_count == algos[0].step_count == 9 and not joiner.in_flight
    for fa, fb in zip(joiner.anchors, algos[0].anchors):
        for a, b in zip(fa, fb):
            assert torch.equal(a, b)
    for oa, ob in zip(joiner.outer_optimizers, algos[0].outer_optimizers):
        for sa, sb in zip(oa.state.values(), ob.state.values()):
            assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    # its replica is θ_g; fragment 1's is every worker's (α = 0), fragment 0's drops its
    # local steps since its last sync, as a worker that joins has none
    theta_g = algos[0].global_parameters()
    for name, p in joiner_model.named_parameters():
        assert torch.equal(p, theta_g[name])
    for p, q in zip(joiner.fragments[1].params, algos[0].fragments[1].params):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="another model"):
        make_workers(1, **{**kw, "fragments": 1, "mode": "diloco"})[1][0].adopt(state)


def test_offload_of_a_cpu_model_changes_nothing():
    """algo.offload on a model already on the CPU: anchors stay where they are and the run
    is the same bit for bit (overlap and mixing, where the anchors are copied back, too);
    on a GPU, tests/gpu/test_cuda.py checks the anchors in pinned host memory."""
    kw = dict(inner="adamw", lr=1e-2, mode="streaming", inner_steps=6, fragments=2, sync_delay=1, codec="fp4-e3m0")
    base_models, base_algos = make_workers(2, **kw)
    run(base_models, base_algos, 14)
    models, algos = make_workers(2, offload=True, **kw)
    run(models, algos, 14)
    assert algos[0].offload and all(a.device.type == "cpu" for fa in algos[0].anchors for a in fa)
    assert_bit_identical(base_models, models)
    for a, b in zip(base_algos[0].anchors, algos[0].anchors):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
