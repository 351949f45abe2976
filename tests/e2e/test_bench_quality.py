"""`farsync bench quality --quick`: the harness runs every stage and method and writes
well-formed results. Its loss figures are not asserted (30 steps of a nano model mean
nothing); the structural facts below hold for any run."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from farsync.bench.quality import HEADLINE, METHODS, QUICK
from farsync.cli.main import app

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    result = CliRunner().invoke(app, ["bench", "quality", "--quick", "--out", str(out / "results"),
                                      "--work-dir", str(out / "work")])
    assert result.exit_code == 0, result.output
    with open(out / "results" / "quality.json") as f:
        return out / "results", json.load(f)


@pytest.mark.slow
def test_writes_json_markdown_and_plots(quick_run):
    res, report = quick_run
    for name in ("quality_loss_vs_tokens.png", "quality_loss_vs_bytes.png", "quality_size_study.png"):
        data = (res / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    md = (res / "quality.md").read_text()
    assert "--quick" in md
    for m in METHODS:
        assert m.label in md
    for heading in ("## M = 4 workers", "## M = 2 workers", "## Tuning", "## Size study", "## Targets"):
        assert heading in md
    assert report["quick"] is True
    assert set(report["targets"]) == {"headline_within_1pct_of_dp", "headline_100x_fewer_bytes",
                                      "peak_about_P_lower", "runtime"}
    assert all(isinstance(t["met"], bool) for t in report["targets"].values())


@pytest.mark.slow
def test_every_table_has_every_method_on_the_same_tokens(quick_run):
    _, report = quick_run
    assert list(report["tables"]) == [str(m) for m in QUICK.workers]
    for M, rows in report["tables"].items():
        assert [r["method"] for r in rows] == [m.key for m in METHODS]
        assert len({r["tokens"] for r in rows}) == 1
        assert rows[0]["tokens"] == QUICK.steps * int(M) * QUICK.batch_size * QUICK.seq_len
        for r in rows:
            run = report["runs"][r["run"]]
            assert run["workers"] == int(M)
            assert math.isfinite(r["final_eval_loss"]) and r["wall_seconds"] > 0
            assert run["curve"][-1]["eval_loss"] == r["final_eval_loss"]
            assert run["curve"][-1]["bytes_sent_total"] == r["bytes_sent_total"]
            assert [p["step"] for p in run["curve"]] == sorted(p["step"] for p in run["curve"])


@pytest.mark.slow
def test_ratios_are_what_they_say(quick_run):
    _, report = quick_run
    for rows in report["tables"].values():
        by = {r["method"]: r for r in rows}
        dp, diloco = by["dp"], by["diloco"]
        for r in rows:
            assert r["dp_bytes_ratio"] == pytest.approx(dp["bytes_sent_total"] / r["bytes_sent_total"])
            assert r["loss_ratio_to_dp"] == pytest.approx(r["final_eval_loss"] / dp["final_eval_loss"])
            assert r["peak_ratio_diloco_to_method"] == pytest.approx(
                diloco["peak_bytes_per_sync"] / r["peak_bytes_per_sync"])
        assert dp["dp_bytes_ratio"] == 1.0
        # DP's measured bytes are the accounting's data-parallel figure
        dp_run = report["runs"][dp["run"]]
        assert dp["bytes_sent_total"] >= dp_run["dp_equivalent_bytes_total"]


@pytest.mark.slow
def test_byte_counts_order_by_codec(quick_run):
    """Same schedule, smaller payloads: fp4 < int8 < fp32, and every exchange method
    sends less than DP, which sends every step."""
    _, report = quick_run
    for rows in report["tables"].values():
        b = {r["method"]: r["bytes_sent_total"] for r in rows}
        p = {r["method"]: r["peak_bytes_per_sync"] for r in rows}
        for fp4 in ("overlap-fp4-e3m0", "overlap-fp4-e2m1"):
            assert b[fp4] < b["overlap-int8"] < b["overlap"]
            assert p[fp4] < p["overlap-int8"] < p["overlap"]
        assert b["overlap"] == b["streaming"]  # τ changes when a sync lands, not what it sends
        assert p["streaming"] < p["diloco"]  # fragments: a part of the model per sync event
        assert max(v for k, v in b.items() if k != "dp") < b["dp"]


@pytest.mark.slow
def test_tuning_and_size_study(quick_run):
    _, report = quick_run
    fams = report["tuning"]["families"]
    # the same sweep budget for every family
    assert len({len(f["grid"]) for f in fams.values()}) == 1
    for fam, f in fams.items():
        losses = [g["final_eval_loss"] for g in f["grid"]]
        assert f["best"]["final_eval_loss"] == min(losses)
        assert f["spread"]["range"] == pytest.approx(max(losses) - min(losses))
        assert report["tuning"]["chosen"][fam] == f["best"]["hparams"]
    # the tables use the chosen hyperparameters
    main = {r["method"]: r for r in report["tables"][str(QUICK.workers[0])]}
    assert main["dp"]["hparams"]["lr"] == report["tuning"]["chosen"]["dp"]["lr"]
    assert main[HEADLINE]["hparams"]["outer_lr"] == report["tuning"]["chosen"]["streaming"]["outer_lr"]
    assert main[HEADLINE]["hparams"]["sync_every"] == report["tuning"]["chosen"]["streaming"]["sync_every"]
    sizes = report["size_study"]
    assert [s["size"] for s in sizes] == list(QUICK.sizes)
    assert sizes[0]["parameters"] < sizes[-1]["parameters"]
    for s in sizes:
        assert s["loss_ratio_to_dp"] == pytest.approx(s["streaming_fp4_eval_loss"] / s["dp_eval_loss"])


def test_bad_flags_fail_with_a_message():
    r = CliRunner().invoke(app, ["bench", "quality", "--workers", "4,x"])
    assert r.exit_code == 2 and "--workers" in r.output
    r = CliRunner().invoke(app, ["bench", "quality", "--sizes", "nano,huge"])
    assert r.exit_code == 2 and "huge" in r.output
