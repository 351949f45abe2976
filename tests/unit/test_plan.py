"""The planner (farsync.plan): link-fit arithmetic, the latency and wait terms it adds to
the simulator, the choice rule and its report, its config errors, a resumed run keeping
its plan, and `farsync train --algo.auto=true` / `farsync plan` in one process."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from farsync import sim
from farsync.cli.main import app
from farsync.plan import SafeRegion, choose, given_link
from farsync.plan.choose import SyncWait, sync_gap
from farsync.plan.link import SizeSample, fit_line, rate_from_sizes
from farsync.train.config import ConfigError, build_config, load_recipe

MICRO = sim.ModelSpec("micro", 4, 160_368.0, 0.04)


# --- link measurement arithmetic --------------------------------------------------------

def test_rate_and_fixed_cost_come_back_from_exact_timings():
    bps, fixed = 10e6, 0.004  # 10 Mbit/s, 4 ms per exchange
    sizes = [SizeSample(n, 3 * n, [fixed + 8 * 3 * n / bps] * 3) for n in (32_768, 65_536, 131_072)]
    got_bps, got_fixed = rate_from_sizes(sizes)
    assert got_bps == pytest.approx(bps, rel=1e-9)
    assert got_fixed == pytest.approx(fixed, rel=1e-9)
    assert sizes[-1].rates_bps()[0] < bps  # a single size's rate includes the fixed cost


def test_a_slope_that_is_not_positive_falls_back_to_the_largest_size():
    sizes = [SizeSample(1000, 1000, [0.002, 0.002, 0.002]), SizeSample(2000, 2000, [0.001] * 3)]
    bps, fixed = rate_from_sizes(sizes)
    assert bps == pytest.approx(8 * 2000 / 0.001) and fixed == 0.0
    assert fit_line([2.0], [4.0]) == (0.0, 2.0)  # one point: through the origin


# --- the simulator's new terms -------------------------------------------------------------

def test_slow_start_costs_round_trips_until_the_window_fills_the_link():
    assert sim.slow_start_extra_s(1e6, 1e9, 0.0) == 0.0
    # 10 Gbit/s, 100 ms: the window never fills the link for 1 MB: 14480·(2^k − 1) ≥ 1e6 at k = 7
    rtt, rate = 0.1, 10e9 / 8
    assert sim.slow_start_extra_s(1e6, 10e9, rtt) == pytest.approx(7 * rtt - 1e6 / rate)
    a, b = sim.slow_start_extra_s(1e6, 1e9, 0.01), sim.slow_start_extra_s(1e6, 1e9, 0.05)
    assert 0 < a < b


@pytest.mark.parametrize("workers,method,phases", [(2, "all-gather", 2), (4, "reduce-scatter", 3)])
def test_farsync_exchanges_pay_one_round_trip_per_phase(workers, method, phases):
    base = dict(model=MICRO, mode="diloco", workers=workers, codec="fp32", bandwidth_gbps=0.01, exchange="auto",
                reductions="after-backward")
    fast = sim.SimConfig(**base, latency_s=0.0, latency_model="phases")
    slow = sim.SimConfig(**base, latency_s=0.005, latency_model="phases")
    ring = sim.SimConfig(**base, latency_s=0.005, latency_model="hops")
    assert fast.exchange_method == method
    n = MICRO.params
    assert slow.collective_seconds(n) - fast.collective_seconds(n) == pytest.approx(phases * 2 * 0.005)
    hops = workers - 1 if method == "all-gather" else 2 * (workers - 1)
    assert ring.collective_seconds(n) - fast.collective_seconds(n) == pytest.approx(hops * 0.005)


def test_a_wait_at_every_sync_costs_utilization_that_overlap_cannot_hide():
    for tau, mode in ((0, "diloco"), (1, "streaming")):
        cfg = sim.SimConfig(MICRO, mode=mode, workers=2, inner_steps=20, fragments=1 if mode == "streaming" else None,
                            sync_delay=tau, codec="fp4-e3m0", bandwidth_gbps=100.0, reductions="after-backward")
        free = sim.simulate(cfg).utilization
        waited = sim.simulate(sim.SimConfig(**{**cfg.__dict__, "sync_wait_s": 0.2})).utilization
        assert free > 0.999
        assert waited == pytest.approx(20 * 0.04 / (20 * 0.04 + 0.2), rel=1e-3)  # H·T / (H·T + wait)
    with pytest.raises(sim.SimInputError):
        sim.SimConfig(MICRO, sync_wait_s=-1.0)


def test_sync_wait_grows_as_the_square_root_of_the_steps_between_syncs():
    w = SyncWait(gap=5, wait_s=0.04)
    assert w.at(5) == pytest.approx(0.04) and w.at(20) == pytest.approx(0.08) and w.at(0) == 0.0
    assert sync_gap("dp", 20, 4) == 1 and sync_gap("streaming", 20, 4) == 5 and sync_gap("diloco", 20, 1) == 20


# --- the choice ---------------------------------------------------------------------------

def _plan(mbit, rtt_ms=0.2, workers=4, waits=None, **kw):
    return choose(MICRO, given_link(workers, mbit, rtt_ms), workers, waits=waits, slow_start=True, **kw)


def test_on_a_fast_link_the_fewest_bytes_win_and_ties_go_to_no_overlap_and_fewer_fragments():
    p = _plan(1000)
    c = p.chosen
    assert p.target_met and (c.inner_steps, c.codec, c.sync_delay) == (20, "fp4-e3m0", 0)
    rivals = [x for x in p.candidates if (x.inner_steps, x.codec, x.sync_delay) == (20, "fp4-e3m0", 0)]
    tenths = lambda x: round(1000 * x.predicted_utilization)  # noqa: E731
    assert tenths(c) == max(tenths(x) for x in rivals)
    assert c.fragments == min(x.fragments for x in rivals if tenths(x) == tenths(c))
    free = _plan(1e6, rtt_ms=0.0).chosen  # every P at 100 %: the fewest fragments
    assert (free.mode, free.fragments, free.sync_delay) == ("diloco", 1, 0)
    # nothing that reaches the target sends fewer bytes
    assert all(x.bytes_per_step >= c.bytes_per_step * (1 - 1e-9) for x in p.candidates
               if x.predicted_utilization >= p.target_utilization)
    assert p.dp_bytes_ratio > 100 and p.dp.mode == "dp"


def test_on_a_slow_link_the_choice_overlaps_and_splits_to_reach_the_target():
    p = _plan(10)
    c = p.chosen
    assert p.target_met and c.predicted_utilization >= 0.95
    assert (c.inner_steps, c.codec) == (20, "fp4-e3m0") and c.sync_delay == 1 and c.fragments > 1
    no_overlap = [x for x in p.candidates if (x.inner_steps, x.codec, x.sync_delay) == (20, "fp4-e3m0", 0)]
    assert no_overlap and all(x.predicted_utilization < 0.95 for x in no_overlap)
    assert all("< target" in x.why_not for x in no_overlap)


def test_an_unreachable_target_is_reported_and_the_best_setting_within_a_point_sends_the_fewest_bytes():
    p = _plan(0.5, waits=SyncWait(5, 0.02))
    assert not p.target_met
    best = max(x.predicted_utilization for x in p.candidates)
    assert p.chosen.predicted_utilization >= best - 0.01
    near = [x for x in p.candidates if x.predicted_utilization >= best - 0.01]
    assert p.chosen.bytes_per_step <= min(x.bytes_per_step for x in near) * (1 + 1e-9)
    from farsync.plan import describe

    assert "MISSES the target" in describe(p)[0]


def test_every_candidate_is_inside_the_region_and_every_loser_says_why():
    region = SafeRegion(min_inner_steps=8, max_inner_steps=12, max_sync_delay=0, max_fragments=2,
                        codecs=("int8", "bf16"))
    p = _plan(50, region=region)
    assert {x.inner_steps for x in p.candidates} == {8, 10, 12}
    assert {x.codec for x in p.candidates} == {"int8", "bf16"}
    assert all(x.sync_delay == 0 and x.fragments <= 2 for x in p.candidates)
    assert all(x.why_not for x in p.candidates if x is not p.chosen) and not p.chosen.why_not
    assert p.outside and p.outside[0].inner_steps == 24 and "outside the safe region" in p.outside[0].why_not
    doc = json.loads(json.dumps(p.to_dict()))  # plan.json is plain JSON
    assert doc["chosen"]["codec"] == "int8" and len(doc["candidates"]) == len(p.candidates)


def test_waiting_for_each_other_can_make_the_target_unreachable():
    assert _plan(1000).target_met
    p = _plan(1000, waits=SyncWait(5, 0.05))
    assert not p.target_met  # 50 ms per 5 steps of 40 ms is 80 % at best
    assert p.chosen.sync_wait_s > 0


# --- sites: R streams per worker --------------------------------------------------------------

def _measured(mbit: float, streams: int, workers: int = 2):
    """A probe's result: ``mbit`` per stream with ``streams`` streams per worker sending at once."""
    from farsync.plan.link import LinkMeasurement

    return LinkMeasurement(workers, mbit * 1e6, 0.0, 2e-4, 2e-4, 2e-4, 0.0, 1.0, streams=streams)


def _utilizations(p):
    return {x.label: x.predicted_utilization for x in p.candidates}


def test_the_probe_measures_one_stream_and_a_shared_link_is_r_times_that():
    from farsync.plan.choose import sim_bandwidth_bps

    # 2 ranks per site probing at once over a shared 20 Mbit/s link: each stream gets 10
    probe = _measured(10, streams=2)
    assert sim_bandwidth_bps(probe, "shared") == pytest.approx(20e6)
    assert sim_bandwidth_bps(probe, "per-rank") == pytest.approx(10e6)
    assert sim_bandwidth_bps(given_link(2, 20, 0.2), "shared") == pytest.approx(20e6)  # given: as it is
    assert sim_bandwidth_bps(given_link(2, 20, 0.2), "per-rank") == pytest.approx(20e6)


def test_a_measured_site_link_predicts_the_same_whether_shared_or_per_rank():
    # the probe loaded all R streams at once: a stream's time is its shard / the measured rate either way
    kw = dict(slow_start=True, region=SafeRegion(max_inner_steps=10))
    for R in (2, 4):
        shared = choose(MICRO, _measured(10 / R, R), 2, ranks=R, links="shared", **kw)
        per_rank = choose(MICRO, _measured(10 / R, R), 2, ranks=R, links="per-rank", **kw)
        one = choose(MICRO, _measured(10, 1), 2, **kw)  # one stream alone on the same 10 Mbit/s
        assert _utilizations(shared) == pytest.approx(_utilizations(per_rank), rel=1e-12)
        assert shared.chosen.label == per_rank.chosen.label
        # ... and what one rank alone on that link predicts (to the codec scales of R shards)
        assert _utilizations(shared) == pytest.approx(_utilizations(one), abs=2e-3)
        assert shared.link["sim_mbit"] == pytest.approx(10) and per_rank.link["sim_mbit"] == pytest.approx(10 / R)
        doc = json.loads(json.dumps(shared.to_dict()))
        assert doc["ranks"] == R and doc["links"] == "shared" and doc["link"]["streams"] == R


def test_a_given_link_is_the_sites_when_shared_and_each_ranks_when_per_rank():
    kw = dict(slow_start=True, region=SafeRegion(max_inner_steps=10))
    shared = choose(MICRO, given_link(2, 5, 0.2), 2, ranks=2, links="shared", **kw)
    per_rank = choose(MICRO, given_link(2, 5, 0.2), 2, ranks=2, links="per-rank", **kw)
    assert _utilizations(shared) == pytest.approx(_utilizations(choose(MICRO, given_link(2, 5, 0.2), 2, **kw)),
                                                  abs=2e-3)
    assert _utilizations(per_rank) == pytest.approx(_utilizations(choose(MICRO, given_link(2, 10, 0.2), 2, **kw)),
                                                    abs=2e-3)
    assert per_rank.dp.predicted_utilization > 1.5 * shared.dp.predicted_utilization  # link-bound: 2x the rate
    with pytest.raises(ValueError, match="plan.links"):
        choose(MICRO, given_link(2, 5, 0.2), 2, ranks=2, links="own")
    with pytest.raises(ValueError, match="ranks"):
        choose(MICRO, given_link(2, 5, 0.2), 2, ranks=0)


@pytest.mark.parametrize("region,message", [
    (dict(min_inner_steps=30, max_inner_steps=20), "plan.min_inner_steps"),
    (dict(max_sync_delay=-1), "plan.max_sync_delay"),
    (dict(max_fragments=-1), "plan.max_fragments"),
    (dict(codecs=("int9",)), "plan.codecs"),
    (dict(codecs=()), "plan.codecs"),
])
def test_bad_bounds_name_the_key(region, message):
    with pytest.raises(ValueError, match=message):
        SafeRegion(**region)


@pytest.mark.parametrize("overrides,message", [
    (["--plan.target_utilization=1.5"], "plan.target_utilization"),
    (["--plan.codecs=fp4-e3m0,int9"], "plan.codecs"),
    (["--plan.bandwidth_mbit=-1"], "plan.bandwidth_mbit"),
    (["--plan.probe_seconds=0"], "plan.probe_seconds"),
    (["--plan.links=own"], "plan.links"),
    (["--algo.auto=true", "--algo.workers=1"], "algo.auto needs algo.workers >= 2"),
    (["--algo.auto=true", "--elastic.enabled=true", "--algo.sync_delay=0"], "algo.auto does not work with elastic"),
])
def test_plan_settings_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config(None, overrides)


# --- in a run --------------------------------------------------------------------------------

FAST = ["--model.size=nano", "--model.seq_len=64", "--data.max_bytes=1000000", "--data.val_fraction=0.1",
        "--data.vocab_size=512", "--train.batch_size=4", "--train.eval_every=10", "--train.eval_batches=2",
        "--train.log_every=5", "--train.threads=1", "--train.progress=false", "--optim.warmup_steps=2",
        "--train.steps=20", "--train.checkpoint_every=10"]
CACHE = os.path.join(os.path.dirname(__file__), "..", "..", ".cache", "farsync")


def _cfg(tmp_path, *extra):
    return build_config(None, [*FAST, f"--data.cache_dir={CACHE}", f"--train.run_dir={tmp_path}", *extra])


def _stopped_at_10(run):
    """The finished run as if it had stopped after its checkpoint of step 10 (a finished
    run is not resumed)."""
    import shutil

    from farsync.train import checkpoint as ckpt

    os.unlink(run / "summary.json")
    shutil.rmtree(ckpt.step_dir(str(run), 20))
    ckpt.commit(str(run), 10, 4)


def test_auto_in_one_process_plans_for_the_given_link_and_trains_with_the_choice(tmp_path, capsys):
    from farsync.train import train

    cfg = _cfg(tmp_path, "--train.name=auto", "--algo.auto=true", "--plan.bandwidth_mbit=1000",
               "--plan.max_inner_steps=10", "--algo.inner_steps=4", "--algo.codec=fp32")
    s = train(cfg)
    doc = json.loads((tmp_path / "auto" / "plan.json").read_text())
    c = doc["chosen"]
    assert doc["link"]["given"] and doc["link"]["measured_mbit"] == 1000
    assert (c["inner_steps"], c["codec"]) == (10, "fp4-e3m0")  # the recipe's H 4 / fp32 replaced
    saved = build_config(load_recipe(str(tmp_path / "auto" / "config.toml")))
    assert (saved.algo.inner_steps, saved.algo.fragments, saved.algo.codec) == (10, c["fragments"], "fp4-e3m0")
    assert saved.algo.auto
    assert s["plan"]["chosen"] == doc["chosen_label"] and s["codec"] == "fp4-e3m0"

    # resumed (as `farsync train --resume` does: its config.toml + overrides) with bounds that
    # would change the plan: the run keeps the one it started with
    again = build_config(load_recipe(str(tmp_path / "auto" / "config.toml")), ["--plan.codecs=int8"])
    before = (tmp_path / "auto" / "plan.json").read_text()
    capsys.readouterr()
    _stopped_at_10(tmp_path / "auto")
    resumed = train(again, run_dir=str(tmp_path / "auto"), resume=True)
    assert "keeping the plan this run started with" in capsys.readouterr().err
    assert resumed["plan"]["chosen"] == doc["chosen_label"]
    assert (tmp_path / "auto" / "plan.json").read_text() == before
    # without its plan.json, a resumed run keeps its config's settings rather than planning anew
    (tmp_path / "auto" / "plan.json").unlink()
    _stopped_at_10(tmp_path / "auto")
    resumed = train(again, run_dir=str(tmp_path / "auto"), resume=True)
    assert "keeps the algo settings of its config.toml" in capsys.readouterr().err
    assert resumed["codec"] == "fp4-e3m0" and resumed["plan"] is None
    # ... where a new run with those bounds plans otherwise
    other = train(build_config(None, [*FAST, f"--data.cache_dir={CACHE}", f"--train.run_dir={tmp_path}",
                                      "--train.name=int8", "--algo.auto=true", "--plan.bandwidth_mbit=1000",
                                      "--plan.max_inner_steps=10", "--plan.codecs=int8"]))
    assert other["plan"]["chosen"] != doc["chosen_label"] and other["codec"] == "int8"


def test_auto_in_one_process_without_a_link_is_a_one_line_error(tmp_path):
    r = CliRunner().invoke(app, ["train", *FAST, f"--data.cache_dir={CACHE}", f"--train.run_dir={tmp_path}",
                                 "--algo.auto=true"])
    assert r.exit_code == 2
    assert "no link to measure" in r.output and "--plan.bandwidth_mbit" in r.output and "Traceback" not in r.output


def test_farsync_plan_prints_the_flags_to_train_with(tmp_path):
    r = CliRunner().invoke(app, ["plan", *FAST, f"--data.cache_dir={CACHE}", f"--train.run_dir={tmp_path}",
                                 "--train.name=p", "--plan.bandwidth_mbit=5", "--plan.rtt_ms=20"])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "p" / "plan.json").read_text())
    c = doc["chosen"]
    assert f"--algo.inner_steps={c['inner_steps']}" in r.output and f"--algo.codec={c['codec']}" in r.output
    assert doc["link"]["rtt_ms"] == pytest.approx(20)
    assert not (tmp_path / "p" / "summary.json").exists()  # nothing trained
