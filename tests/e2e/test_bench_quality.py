"""`farsync bench quality --quick`: the harness runs every stage and writes well-formed
results. Its loss figures are not asserted (a few steps of a nano model mean nothing);
the structural facts below hold for any run."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from farsync.bench.quality import AT_STREAMING_H, QUICK, QualitySpec, scaling_law_gap_pct
from farsync.cli.main import app

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GAP_KEYS = {"size", "parameters", "tokens", "method", "workers", "codec", "eval_loss", "dp_eval_loss", "gap_pct",
            "bytes_ratio", "seeds"}


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
    for name in ("quality_sweeps.png", "quality_loss_vs_tokens.png", "quality_loss_vs_bytes.png"):
        data = (res / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    md = (res / "quality.md").read_text()
    assert "--quick" in md
    for heading in ("## Gap to data-parallel", "## Tuning (equal budgets)", "## Targets"):
        assert heading in md
    assert report["quick"] is True
    assert set(report["targets"]) == {"m1_within_half_pct", "m4_within_scaling_law", "headline_within_1pt_of_diloco",
                                      "headline_100x_fewer_bytes", "stretch_m4_within_2pct", "runtime",
                                      "sparse_bytes_within_1pt_of_headline", "stretch_sparse_3x_bytes",
                                      "stretch_sparse_below_headline"}
    assert (res / "quality_frontier.png").read_bytes().startswith(PNG_MAGIC)
    assert "## The frontier" in md
    assert all(isinstance(t["met"], bool) for t in report["targets"].values())


@pytest.mark.slow
def test_gap_table_schema_and_arithmetic(quick_run):
    _, report = quick_run
    rows, runs = report["gap_table"], report["runs"]
    papers = [r for r in rows if not r["frontier"]]  # the stages before the sparse frontier
    for r in rows:
        assert GAP_KEYS <= set(r), GAP_KEYS - set(r)
        assert r["method"] in ("dp", "diloco", "streaming", "streaming-overlap")
        assert r["size"] == QUICK.size
    # DP and DiLoCo at every M, Streaming at M = tune_workers
    assert [r["workers"] for r in papers if r["method"] == "dp"] == sorted(QUICK.workers)
    assert sorted(r["workers"] for r in papers if r["method"] == "diloco" and not r["variant"]) == sorted(QUICK.workers)
    assert {r["workers"] for r in papers if r["method"].startswith("streaming")} == {QUICK.tune_workers}
    assert sorted(r["codec"] for r in papers if r["method"] == "streaming-overlap" and not r["variant"]) == \
        sorted(QUICK.streaming_codecs)
    # every run sees the same tokens, and the gap is per seed, then averaged
    assert len({r["tokens"] for r in rows}) == 1
    dp = {r["workers"]: r for r in rows if r["method"] == "dp"}
    for r in rows:
        losses = [runs[n]["final_eval_loss"] for n in r["runs"]]
        for base, key in ((dp[r["workers"]], "gap_pct"), (dp[1], "gap_pct_vs_dp_m1")):  # same M; and M = 1
            dps = [runs[n]["final_eval_loss"] for n in base["runs"][: len(r["seeds"])]]
            assert r[key] == pytest.approx(sum(100 * (a / b - 1) for a, b in zip(losses, dps)) / len(losses))
        assert r["eval_loss"] == pytest.approx(sum(losses) / len(losses))
        assert all(math.isfinite(x) for x in losses)
        run = runs[r["runs"][0]]
        assert run["curve"][-1]["eval_loss"] == run["final_eval_loss"]
        assert run["curve"][-1]["bytes_sent_total"] == run["bytes_sent_total"]
        if r["method"] != "dp" and r["workers"] > 1:
            assert r["bytes_ratio"] == pytest.approx(run["dp_equivalent_bytes_per_worker"] / run["bytes_sent_per_worker_max"])
        if r["method"] == "diloco":
            assert r["scaling_law_gap_pct"] == scaling_law_gap_pct(r["workers"], r["parameters"])
    assert all(r["gap_pct"] == 0.0 for r in dp.values())
    # DP at every M is the tuned DP, on that M's batches: the same lr, its own runs
    assert len({r["hparams"]["lr"] for r in dp.values()}) == 1 and len({r["runs"][0] for r in dp.values()}) == len(dp)


@pytest.mark.slow
def test_seeds_bytes_and_tuning(quick_run):
    _, report = quick_run
    rows = report["gap_table"]
    by = {(r["method"], r["workers"], r["codec"], r["variant"]): r for r in rows if not r["frontier"]}
    M = QUICK.tune_workers
    head = by[("streaming-overlap", M, QUICK.headline_codec, None)]
    # headline rows carry every seed; the others seed 0 only
    for r in rows:
        headline = (r["method"] in ("dp", "diloco") and not r["variant"]) or r is head  # DP: every M
        headline = headline or r["runs"][0] == report["sparse_headline_run"]
        assert r["seeds"] == (list(QUICK.seeds) if headline else [0])
        assert len(r["runs"]) == len(r["seeds"])
    # same schedule, smaller payloads: fp4 < int8 < fp32; fragments lower the peak
    b = {r["codec"]: r["bytes_sent_total"] for r in rows if r["method"] == "streaming-overlap" and not r["variant"]
         and not r["frontier"]}
    assert b["fp4-e3m0"] < b["int8"] < b["fp32"]
    assert by[("streaming", M, "fp32", None)]["peak_bytes_per_sync"] < by[("diloco", M, "fp32", None)]["peak_bytes_per_sync"]
    # equal tuning budgets; the best is the minimum; Streaming reuses DiLoCo's tuned values
    t = report["tuning"]
    assert len(t["dp"]["grid"]) == len(t["diloco"]["grid"])
    for s in [t["dp"], t["diloco"], *t["diloco_outer_lr_by_workers"].values()]:
        assert s["best"]["final_eval_loss"] == min(g["final_eval_loss"] for g in s["grid"])
    assert all(r["hparams"] == t["dp"]["best"]["hparams"] for r in rows if r["method"] == "dp")
    assert by[("diloco", M, "fp32", None)]["hparams"] == t["diloco"]["best"]["hparams"]
    # Streaming: DiLoCo's tuned values, at the H that meets the bytes target if the tuned one does not
    best = t["diloco"]["best"]["hparams"]
    assert head["hparams"] == {**best, "inner_steps": QUICK.streaming_inner_steps(best["inner_steps"])}
    if head["hparams"] != best:
        assert by[("diloco", M, "fp32", AT_STREAMING_H)]["hparams"] == head["hparams"]
    # the headline's α is the best of the sweep, and every overlapped row uses it
    mix = t["streaming_mixing"]
    assert sorted(g["mixing"] for g in mix["grid"]) == sorted(QUICK.overlap_mixings)
    assert head["mixing"] == min(mix["grid"], key=lambda g: g["final_eval_loss"])["mixing"]
    assert {r["mixing"] for r in rows if r["method"] == "streaming-overlap"} == {head["mixing"]}


@pytest.mark.slow
def test_the_sparse_frontier_is_tuned_with_equal_budgets_and_counted_exactly(quick_run):
    _, report = quick_run
    rows, t = report["gap_table"], report["tuning"]
    M = QUICK.tune_workers
    sparse = [r for r in rows if r["family"]]
    # both families at the headline density, equal budgets; the best is the minimum
    fam = {f: t[f"sparse_{f}"] for f in ("sparseloco", "ef-nesterov")}
    assert len(fam["sparseloco"]["grid"]) == len(fam["ef-nesterov"]["grid"]) == len(QUICK.sparseloco_outer_lrs)
    for s in fam.values():
        assert s["best"]["final_eval_loss"] == min(g["final_eval_loss"] for g in s["grid"])
        assert all(g["error_feedback_decay"] is not None for g in s["grid"])
    assert all(g["hparams"]["outer_momentum"] == 0 for g in fam["sparseloco"]["grid"])
    # every density at each family's best, all with error feedback, all sparse rows of the frontier
    for f, s in fam.items():
        best = s["best"]["hparams"]
        got = {r["codec"] for r in sparse if r["family"] == f and r["workers"] == M and r["hparams"] == best}
        assert got == set(QUICK.sparse_codecs), (f, got)
    assert all(r["frontier"] and r["error_feedback_decay"] is not None for r in sparse)
    # fewer values sent, fewer bytes: the same schedule at 1/16 and 1/64
    ratio = {r["codec"]: r["bytes_ratio"] for r in sparse if r["workers"] == M and r["family"] == "sparseloco"}
    assert ratio["topk64-int2"] > 3 * ratio["topk16-int2"] > 3 * by_codec(rows, M, QUICK.headline_codec)["bytes_ratio"]
    # the other M: the headline and the better family again
    for m in QUICK.frontier_workers:
        assert {r["codec"] for r in rows if r["workers"] == m and r["frontier"]} == {QUICK.headline_codec,
                                                                                      QUICK.sparse_headline}
    assert set(report["frontier"]) == {str(M), *map(str, QUICK.frontier_workers)}
    assert all(p["bytes_ratio"] > 0 for ps in report["frontier"].values() for p in ps)


def by_codec(rows, M, codec):
    return next(r for r in rows if r["workers"] == M and r["codec"] == codec and r["method"] == "streaming-overlap"
                and not r["variant"] and not r["frontier"])


def test_the_full_spec_is_the_papers_regime():
    """The defaults give every DiLoCo run ≥ 50 rounds at ≈ 20 tokens per parameter."""
    spec = QualitySpec()
    spec.validate()
    steps, n = spec.steps(), spec.parameters()
    assert abs(steps * spec.global_batch * spec.seq_len / n - 20) < 0.5
    assert all(steps // H >= 50 and steps % H == 0 for *_, H in spec.diloco_grid)
    # Streaming + fp4 reaches 100× fewer bytes than DP at some H of the grid
    assert spec.streaming_bytes_ratio(max(p[-1] for p in spec.diloco_grid)) >= spec.streaming_min_bytes_ratio
    assert len(spec.dp_lrs) == len(spec.diloco_grid)
    with pytest.raises(ValueError, match="eval_sequences"):
        QualitySpec(eval_sequences=100).validate()  # not the same held-out set at every M
    with pytest.raises(ValueError, match="fewer than"):
        QualitySpec(diloco_grid=spec.diloco_grid[:-1] + ((4e-3, 0.7, 0.8, 60),)).validate()


@pytest.mark.slow
def test_reuse_reads_back_unchanged_runs_and_trains_the_rest(quick_run, tmp_path):
    """--reuse in a work dir holding every run trains nothing and reports the same gaps;
    a run whose config changed is trained again."""
    res, report = quick_run
    work = res.parent / "work"
    changed = report["gap_table"][0]["runs"][0]  # DP, seed 0: tamper with its saved config
    cfg_path = work / changed / "config.toml"
    cfg_path.write_text(cfg_path.read_text().replace("seed = 0", "seed = 7"))
    out = tmp_path / "again"
    r = CliRunner().invoke(app, ["bench", "quality", "--quick", "--reuse", "--out", str(out), "--work-dir", str(work)])
    assert r.exit_code == 0, r.output
    again = json.loads((out / "quality.json").read_text())
    assert set(again["reused_runs"]) == set(report["runs"]) - {changed}
    assert again["runs"][changed]["reused"] is False
    assert [x["gap_pct"] for x in again["gap_table"]] == pytest.approx([x["gap_pct"] for x in report["gap_table"]])
    assert again["targets"]["runtime"]["estimated"] is True


def test_bad_flags_fail_with_a_message():
    r = CliRunner().invoke(app, ["bench", "quality", "--tokens-per-param", "-1"])
    assert r.exit_code == 2 and "--tokens-per-param" in r.output
    r = CliRunner().invoke(app, ["bench", "quality", "--size", "huge"])
    assert r.exit_code == 2 and "huge" in r.output
