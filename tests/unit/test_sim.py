"""Compute-utilization simulator (farsync.sim): known answers, monotonicity, the effect
of every open modelling choice, Table 4's 1B row, and the `farsync simulate` CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from farsync import sim
from farsync.cli.main import app
from farsync.sim import (
    METHODS,
    PAPER_GRID,
    PAPER_TABLE4_1B,
    ModelSpec,
    SimConfig,
    SimInputError,
    method_config,
    preset,
    required_bandwidth,
    required_table,
    simulate,
    utilization,
)

ONE_B = preset("1b")


def cfg(method: str, bw: float = 1.0, model: ModelSpec = ONE_B, **kw) -> SimConfig:
    return method_config(model, method, bandwidth_gbps=bw, **kw)


# --- known answers -----------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_no_communication_is_full_utilization(method):
    # one worker: nothing to exchange, every step takes exactly the pure-compute time
    r = simulate(cfg(method, 0.001, workers=1))
    assert r.utilization == pytest.approx(1.0, abs=1e-12)
    assert r.wall_per_step_s == pytest.approx(ONE_B.step_time)
    assert r.bytes_per_step == 0


@pytest.mark.parametrize("method", list(METHODS))
def test_utilization_rises_with_bandwidth(method):
    utils = sim.utilization_curve(cfg(method), PAPER_GRID)
    assert all(b >= a - 1e-12 for a, b in zip(utils, utils[1:]))
    assert utils[0] < 0.5 and utils[-1] > 0.99


def test_fp4_moves_eight_times_fewer_bytes_than_fp32():
    fp32 = simulate(cfg("streaming", codec="fp32", count_scales=False))
    fp4 = simulate(cfg("streaming", codec="fp4-e3m0", count_scales=False))
    assert fp32.bytes_per_step / fp4.bytes_per_step == pytest.approx(8.0, rel=1e-7)
    even = ModelSpec("even", 24, 24e6, 0.1)  # whole bytes per layer: exactly 8x
    b32 = simulate(cfg("diloco", model=even, codec="fp32", count_scales=False)).bytes_per_step
    b4 = simulate(cfg("diloco", model=even, codec="fp4-e3m0", count_scales=False)).bytes_per_step
    assert b32 == 8 * b4
    assert sim.wire_format("fp32").value_bits / sim.wire_format("fp4-e3m0").value_bits == 8
    # with its scales counted, farsync's FP4 (one fp32 scale per 32 values) costs 5 bits
    # per value: 6.4x less; the Table 4 assumption of a scale per 128 values, 4.25 bits
    fp4s = simulate(cfg("streaming", codec="fp4-e3m0"))
    assert fp32.bytes_per_step / fp4s.bytes_per_step == pytest.approx(32 / 5, rel=1e-6)
    fp4p = simulate(cfg("streaming", codec="fp4-e3m0", codec_block_size=128))
    assert fp32.bytes_per_step / fp4p.bytes_per_step == pytest.approx(32 / 4.25, rel=1e-6)
    # Table 4's FP4 method: the paper's 4 bits per value, one scale per layer's collective
    paper = simulate(method_config(ONE_B, "streaming-overlap-fp4"))
    bf16 = simulate(method_config(ONE_B, "streaming-overlap"))
    assert bf16.bytes_per_step / paper.bytes_per_step == pytest.approx(4.0, rel=1e-6)


@pytest.mark.parametrize("bw", [0.5, 3.0, 20.0, 200.0])
@pytest.mark.parametrize("reductions", sim.REDUCTIONS)
def test_single_fragment_streaming_equals_diloco(bw, reductions):
    s = simulate(cfg("streaming", bw, fragments=1, reductions=reductions))
    d = simulate(cfg("diloco", bw, reductions=reductions))
    assert s.utilization == d.utilization
    assert s.bytes_per_step == d.bytes_per_step


def test_diloco_matches_closed_form_when_link_bound():
    # link slower than the backward pass: the per-layer reductions queue back to back from
    # the end of BP_{L-1}; the next forward waits for R_0. Exposed per round:
    # L·c - (2L - 3)·u, with c one layer's reduction and u one compute node.
    c_cfg = cfg("diloco", 2.0)
    L, T, H = ONE_B.layers, ONE_B.step_time, c_cfg.inner_steps
    u = T / (3 * L - 1)
    c = 2 * (ONE_B.params / L) * 8 / 2e9  # bf16, M=2 ring moves one payload
    assert c > 2 * u
    expected = H * T / (H * T + L * c - (2 * L - 3) * u)
    assert simulate(c_cfg).utilization == pytest.approx(expected, rel=1e-6)


def test_dp_matches_closed_form_when_reductions_hide_behind_backward():
    # each layer's gradient reduction is shorter than one layer's backward: only the last
    # one (block 0) is exposed, so each step costs T + c
    bw = 2000.0
    L, T = ONE_B.layers, ONE_B.step_time
    c = 2 * (ONE_B.params / L) * 8 / (bw * 1e9)
    assert c < 2 * T / (3 * L - 1)
    assert simulate(cfg("dp", bw)).utilization == pytest.approx(T / (T + c), rel=1e-6)


def test_dp_bytes_per_step_match_design_formula():
    # DP sends 2(M-1)/M × 4 bytes × parameters per step (fp32)
    for M in (2, 4, 8):
        r = simulate(cfg("dp", 100.0, codec="fp32", workers=M))
        assert r.bytes_per_step == pytest.approx(2 * (M - 1) / M * 4 * ONE_B.params, rel=1e-6)


def test_streaming_sends_same_bytes_as_diloco_with_p_times_lower_peak():
    s = simulate(cfg("streaming", 10.0))
    d = simulate(cfg("diloco", 10.0))
    assert s.bytes_per_step == pytest.approx(d.bytes_per_step, rel=1e-6)
    assert d.peak_sync_bytes / s.peak_sync_bytes == pytest.approx(8.0, rel=1e-6)


def test_fragment_offsets_follow_design():
    # H = 100, P = 2: fragment 0 syncs at the end of steps 100, 200, … (index 99),
    # fragment 1 at 50, 150, … (index 49)
    c = SimConfig(model=ModelSpec("t", 4, 1e6, 1.0), mode="streaming", fragments=2)
    assert c.sync_table() == {99: [0, 2], 49: [1, 3]}
    assert replace(c, fragment_pattern="sequential").sync_table() == {99: [0, 1], 49: [2, 3]}
    # the paper's H = 100, P = 8: offsets floor(p·12.5)
    c8 = cfg("streaming")
    assert sorted(c8.sync_table()) == sorted((o - 1) % 100 for o in (0, 12, 25, 37, 50, 62, 75, 87))
    assert c8.n_fragments == 8 and all(len(v) == 3 for v in c8.sync_table().values())


def test_presets_match_the_paper():
    assert [(p.layers, p.params, p.step_time) for p in sim.PRESETS.values()] == [
        (24, 1e9, 0.1), (48, 1e10, 0.8), (108, 1e11, 4.9)
    ]
    assert [cfg("streaming", model=p).n_fragments for p in sim.PRESETS.values()] == [8, 16, 36]


def test_paper_grid_contains_table4_values():
    rounded = {round(float(g), 1) for g in PAPER_GRID}
    for v in (1.4, 1.7, 2.0, 2.4, 3.6, 4.3, 5.2, 7.5, 9.1, 11.0, 13.3, 16.0, 19.3, 23.3, 28.1,
              152.6, 184.2, 222.3, 569.0):
        assert v in rounded
    assert PAPER_GRID[1] / PAPER_GRID[0] == pytest.approx(10 ** (4 / 49))


# --- the target: Table 4, 1B row ------------------------------------------------------------


def test_table4_1b_row_within_one_grid_step():
    table = required_table(ONE_B)
    errors = sim.grid_step_errors(table)
    bad = {(m, t): d for m, row in errors.items() for t, d in row.items() if d is None or abs(d) > 1}
    assert not bad, bad


def test_required_bandwidth_is_the_smallest_grid_point():
    c = cfg("streaming-overlap")
    b = required_bandwidth(c, 0.9)
    i = int(list(PAPER_GRID).index(b))
    assert utilization(sim.with_bandwidth(c, PAPER_GRID[i])) >= 0.9
    assert utilization(sim.with_bandwidth(c, PAPER_GRID[i - 1])) < 0.9
    exact = required_bandwidth(c, 0.9, grid="exact")
    assert PAPER_GRID[i - 1] < exact <= b
    assert utilization(sim.with_bandwidth(c, exact)) >= 0.9


# --- every open choice is a parameter, and it matters --------------------------------------


def test_latency_raises_required_bandwidth():
    for m in ("diloco", "streaming-overlap"):
        base = required_bandwidth(cfg(m), 0.9, grid="exact")
        slow = required_bandwidth(cfg(m, latency_s=0.005), 0.9, grid="exact")
        assert slow > base
    assert utilization(cfg("dp", 100.0, latency_s=0.01)) < utilization(cfg("dp", 100.0))
    # DP pays 2·latency per layer per step: 24 layers × 2 × 10 ms >> 0.1 s of compute
    assert required_bandwidth(cfg("dp", latency_s=0.01), 0.5) is None


def test_mfu_sets_step_time_and_slower_compute_needs_less_bandwidth():
    fast = ModelSpec.from_flops(24, 1e9, peak_flops=1e15, mfu=0.5, tokens_per_step=1e6)
    slow = ModelSpec.from_flops(24, 1e9, peak_flops=1e15, mfu=0.25, tokens_per_step=1e6)
    assert fast.step_time == pytest.approx(6 * 1e9 * 1e6 / (1e15 * 0.5))
    assert slow.step_time == pytest.approx(2 * fast.step_time)
    assert ModelSpec.from_flops(24, 1e9, peak_flops=1e15, mfu=0.5, flops_per_step=6e15,
                                accelerators=4).step_time == pytest.approx(3.0)
    assert ONE_B.scaled(2.0).step_time == pytest.approx(0.2)
    b_fast = required_bandwidth(cfg("diloco", model=fast), 0.5, grid="exact")
    b_slow = required_bandwidth(cfg("diloco", model=slow), 0.5, grid="exact")
    assert b_slow == pytest.approx(b_fast / 2, rel=0.02)


def test_overlap_never_hurts_and_more_delay_helps():
    for bw in (2.0, 5.0, 10.0):
        u0 = utilization(cfg("streaming", bw))
        u1 = utilization(cfg("streaming-overlap", bw))
        u4 = utilization(cfg("streaming-overlap", bw, sync_delay=4))
        assert u0 <= u1 <= u4
    assert utilization(cfg("streaming-overlap", 5.0)) > utilization(cfg("streaming", 5.0))


def test_reducing_after_backward_costs_utilization():
    for m in ("dp", "diloco", "streaming"):
        per_layer = utilization(cfg(m, 20.0))
        after = utilization(cfg(m, 20.0, reductions="after-backward"))
        assert after < per_layer


def test_strided_fragments_hide_more_than_sequential():
    strided = utilization(cfg("streaming", 20.0))
    sequential = utilization(cfg("streaming", 20.0, fragment_pattern="sequential"))
    assert strided > sequential


def test_more_workers_move_more_bytes_per_link():
    u2 = simulate(cfg("diloco", 5.0, workers=2))
    u8 = simulate(cfg("diloco", 5.0, workers=8))
    assert u8.bytes_per_step / u2.bytes_per_step == pytest.approx((2 * 7 / 8) / 1.0)
    assert u8.utilization < u2.utilization
    ag = simulate(cfg("diloco", 5.0, workers=8, exchange="all-gather"))
    assert ag.bytes_per_step / u2.bytes_per_step == pytest.approx(7.0)


def test_wire_codec_choice_moves_the_table():
    # fp32 on the wire doubles bf16's bytes: required bandwidth for DiLoCo at 50 % doubles
    b16 = required_bandwidth(cfg("diloco"), 0.5, grid="exact")
    b32 = required_bandwidth(cfg("diloco", codec="fp32"), 0.5, grid="exact")
    assert b32 / b16 == pytest.approx(2.0, rel=0.01)


def test_wall_clock_for_token_budget():
    r = simulate(cfg("diloco", 5.0))
    tokens, per_step = 1e10, 1e6
    steps = tokens / (2 * per_step)
    assert r.wall_clock_s(tokens, per_step) == pytest.approx(steps * ONE_B.step_time / r.utilization)


# --- sites: R ranks per worker, R streams -------------------------------------------------

EVEN = ModelSpec("even", 4, 4 * 2**16, 0.05)  # shards of whole codec blocks at R = 1, 2, 4


def site(R: int, links: str = "shared", bw: float = 0.002, **kw) -> SimConfig:
    return SimConfig(model=EVEN, mode="streaming", workers=2, inner_steps=20, fragments=2, sync_delay=1,
                     codec="fp4-e3m0", bandwidth_gbps=bw, reductions="after-backward", exchange="auto",
                     latency_model="phases", ranks=R, links=links, **kw)


@pytest.mark.parametrize("R", [2, 4])
def test_a_shared_link_carries_r_streams_in_the_time_of_one(R):
    # R shards of 1/R, side by side on one link: the same bytes, the same link time
    one, many = simulate(site(1)), simulate(site(R))
    assert many.bytes_per_step == pytest.approx(one.bytes_per_step, rel=1e-12)
    assert many.link_busy_per_step_s == pytest.approx(one.link_busy_per_step_s, rel=1e-12)
    assert many.utilization == pytest.approx(one.utilization, rel=1e-12)
    assert one.utilization < 0.9  # link-bound here, so the link time decides


@pytest.mark.parametrize("R", [2, 4])
def test_a_link_per_rank_is_r_times_the_bandwidth(R):
    per_rank = simulate(site(R, "per-rank"))
    assert per_rank.link_busy_per_step_s == pytest.approx(simulate(site(1)).link_busy_per_step_s / R, rel=1e-12)
    assert per_rank.utilization == pytest.approx(simulate(site(1, bw=0.002 * R)).utilization, rel=1e-12)
    assert per_rank.utilization > simulate(site(R)).utilization


def test_streams_pay_latency_once_and_ramp_up_each_on_its_share():
    fast = dict(bw=1000.0, latency_s=0.01)  # latency-bound: 2 phases x 20 ms, whatever R
    assert site(4, **fast).collective_seconds(2**17) == pytest.approx(site(1, **fast).collective_seconds(2**17),
                                                                      rel=1e-3)
    slow = dict(bw=0.05, latency_s=0.02, tcp_slow_start=True)
    n = 2**17
    for R in (1, 2, 4):
        c = site(R, **slow)
        shard = c.wire_format.wire_bytes(n / R)
        expected = shard * 8 / (0.05e9 / R) + 2 * 0.04 + sim.slow_start_extra_s(shard, 0.05e9 / R, 0.04)
        assert c.collective_seconds(n) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("R", [1, 2, 4])
@pytest.mark.parametrize("codec", ["fp32", "fp4-e3m0", "int8"])
def test_site_bytes_are_farsyncs_shards(R, codec):
    # farsync's SiteCommunicator cuts R shards at codec blocks and exchanges each as a buffer
    from farsync.codecs import get_codec
    from farsync.comm.exchange import make_plan
    from farsync.comm.site import shard_numel

    c = get_codec(codec)
    n = 3 * 2**15  # a whole number of blocks per shard
    cfg = replace(site(R), codec=codec)
    ours = R * make_plan(shard_numel(n, R, c.alignment), 2, c).bytes_sent
    assert cfg.bytes_sent_per_worker(n) == ours


def test_cli_ranks_and_links():
    args = ["simulate", "--layers", "4", "--params", "262144", "--step-time", "0.05", "--method", "streaming",
            "--bandwidth", "0.02", "--json"]
    out = {R_links: json.loads(runner.invoke(app, [*args, *R_links]).stdout)["at_bandwidth"]["methods"]["streaming"]
           for R_links in [(), ("--ranks", "2"), ("--ranks", "2", "--links", "per-rank")]}
    one, shared, per_rank = out.values()
    assert shared["utilization"] == pytest.approx(one["utilization"], rel=1e-9)
    assert shared["bytes_per_step_per_stream"] == pytest.approx(one["bytes_per_step_per_worker"] / 2, rel=1e-6)
    assert per_rank["utilization"] > shared["utilization"]


# --- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, option",
    [
        (dict(bandwidth_gbps=0.0), "bandwidth_gbps"),
        (dict(bandwidth_gbps=-1.0), "bandwidth_gbps"),
        (dict(codec="fp8"), "codec"),
        (dict(fragments=5), "fragments"),
        (dict(sync_delay=13), "sync_delay"),  # H/P = 100/8 = 12.5
        (dict(latency_s=-1.0), "latency_s"),
        (dict(workers=0), "workers"),
        (dict(reductions="eager"), "reductions"),
        (dict(ranks=0), "ranks"),
        (dict(ranks=1.5), "ranks"),
        (dict(links="own"), "links"),
    ],
)
def test_bad_config_names_the_option(kw, option):
    with pytest.raises(SimInputError) as e:
        method_config(ONE_B, "streaming-overlap", **{"bandwidth_gbps": 1.0, **kw})
    assert e.value.option == option


def test_bad_names():
    with pytest.raises(SimInputError, match="preset"):
        preset("2b")
    with pytest.raises(SimInputError, match="method"):
        method_config(ONE_B, "fedavg")
    with pytest.raises(SimInputError, match="mfu"):
        ModelSpec.from_flops(24, 1e9, peak_flops=1e15, mfu=1.5, tokens_per_step=1)


# --- CLI -------------------------------------------------------------------------------


runner = CliRunner()


def test_cli_json_for_preset():
    r = runner.invoke(app, ["simulate", "--preset", "1b", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["preset"] == "1b" and out["grid"] == "paper"
    assert set(out["required_gbps"]) == set(METHODS)
    for row in out["required_gbps"].values():
        assert list(row) == ["0.5", "0.8", "0.9", "0.95", "0.99"]
    assert out["required_gbps"]["dp"]["0.5"] == pytest.approx(PAPER_GRID[37], abs=0.01)


def test_cli_at_bandwidth_with_custom_model_and_tokens(tmp_path):
    png = tmp_path / "u.png"
    r = runner.invoke(app, [
        "simulate", "--layers", "12", "--params", "125M", "--tokens-per-step", "500k",
        "--peak-tflops", "300", "--mfu", "0.4", "--method", "diloco,streaming-overlap",
        "--bandwidth", "1", "--tokens", "1e9", "--plot", str(png), "--json",
    ])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["model"]["step_time_s"] == pytest.approx(6 * 125e6 * 500e3 / (300e12 * 0.4))
    m = out["at_bandwidth"]["methods"]["diloco"]
    assert 0 < m["utilization"] <= 1 and m["wall_clock_s"] > 0
    assert png.stat().st_size > 1000


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--preset", "2b"], "--preset"),
        (["--method", "fedavg"], "--method"),
        (["--codec", "fp8"], "--codec"),
        (["--bandwidth", "0"], "--bandwidth"),
        (["--bandwidth", "-3"], "--bandwidth"),
        (["--fragments", "5"], "--fragments"),
        (["--sync-delay", "13"], "--sync-delay"),
        (["--method", "dp", "--sync-delay", "1"], "--sync-delay"),
        (["--latency-ms", "-1"], "--latency-ms"),
        (["--grid", "coarse"], "--grid"),
        (["--targets", "0.5,1.2"], "--targets"),
        (["--params", "lots"], "--params"),
        (["--ranks", "0"], "--ranks"),
        (["--links", "own"], "--links"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args, flag):
    r = runner.invoke(app, ["simulate", *args])
    assert r.exit_code == 2, r.output
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and flag in lines[0], r.stderr
    assert "Traceback" not in r.output


def test_cli_human_output():
    r = runner.invoke(app, ["simulate", "--preset", "10b", "--bandwidth", "5"])
    assert r.exit_code == 0, r.output
    assert "Streaming DiLoCo + overlap + FP4" in r.stdout and "utilization" in r.stdout
    dp_line = next(l for l in r.stdout.splitlines() if l.strip().startswith("Data-parallel"))
    assert 0 < float(dp_line.split("utilization")[1].split("%")[0]) <= 100


def test_wire_sizes_match_the_real_codecs():
    from farsync.codecs import get_codec

    for name, fmt in sim.WIRE_FORMATS.items():
        codec = get_codec(name)
        n = 1_000_000 - 1_000_000 % codec.alignment
        assert fmt.wire_bytes(n) == codec.encoded_nbytes(n), name
