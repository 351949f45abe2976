"""`farsync train` end to end: each method, resume, bad input, torchrun == in-process."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from farsync.train import checkpoint as ckpt
from farsync.train.config import build_config
from farsync.train import train

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# A small but real setup: the stdlib corpus capped at 1 MB, a 512-token BPE, the nano model.
FAST = [
    "--model.size=nano", "--model.seq_len=64", "--data.max_bytes=1000000", "--data.val_fraction=0.1",
    "--data.vocab_size=512", "--train.batch_size=4", "--train.eval_every=6", "--train.eval_batches=2",
    "--train.log_every=2", "--train.threads=1", "--train.launch=inprocess", "--train.progress=false", "--algo.inner_steps=4",
    "--optim.warmup_steps=2",
]


def cli(*args, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "farsync", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def fast(tmp_path, *extra):
    return [*FAST, f"--data.cache_dir={CACHE}", f"--train.run_dir={tmp_path}", *extra]


CACHE = os.path.join(os.path.dirname(__file__), "..", "..", ".cache", "farsync")
NO_TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "no_text_field.jsonl")


@pytest.mark.parametrize("mode,extra", [
    ("dp", []),
    ("diloco", ["--algo.fragments=1", "--algo.sync_delay=0", "--algo.codec=fp32"]),
    ("streaming", ["--algo.fragments=2", "--algo.sync_delay=1", "--algo.codec=fp4-e3m0"]),
])
def test_each_method_trains_and_writes_a_run_directory(tmp_path, mode, extra):
    r = cli("train", *fast(tmp_path, f"--algo.mode={mode}", "--train.steps=12", "--train.name=run", *extra))
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    for name in ("config.toml", "metrics.jsonl", "summary.json", "loss.png", "bytes.png", "checkpoints/latest.json"):
        assert (run / name).exists(), name
    s = json.loads((run / "summary.json").read_text())
    assert s["mode"] == mode and s["steps"] == 12 and s["tokens"] == 12 * 4 * 4 * 64
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [x["eval_loss"] for x in rows if x["kind"] == "eval"]
    assert len(evals) == 2 and evals[-1] == s["final_eval_loss"]
    assert evals[-1] < 6.0  # ln(512) = 6.24 at init: it learned something
    sent = s["bytes_sent_per_worker"]
    assert len(sent) == 4 and len(set(sent)) == 1
    if mode == "dp":
        assert s["sync_events"] == 12 and 0.9 < s["dp_bytes_ratio"] <= 1.0  # padding and handshake only
    else:
        assert s["dp_bytes_ratio"] > 2
    assert "final eval loss" in r.stdout


def _run(tmp_path, name, steps=40, **extra):
    args = fast(tmp_path, f"--train.steps={steps}", f"--train.name={name}", "--algo.mode=streaming",
                "--algo.fragments=2", "--algo.sync_delay=1", "--algo.codec=fp4-e2m1",
                "--algo.stochastic_rounding=true", "--train.checkpoint_every=0")
    return build_config(None, [a for a in args] + [f"--{k}={v}" for k, v in extra.items()])


def test_ctrl_c_checkpoints_and_resume_equals_uninterrupted_run(tmp_path):
    full = train(_run(tmp_path, "full"))

    cfg = _run(tmp_path, "cut")
    metrics = tmp_path / "cut" / "metrics.jsonl"

    def press_ctrl_c():  # once training is under way
        while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    cut = train(cfg)
    assert "stopped_at" in cut and cut["stopped_at"] < 40, cut
    assert ckpt.latest_step(str(tmp_path / "cut")) == cut["stopped_at"]
    assert not (tmp_path / "cut" / "summary.json").exists()

    resumed = train(cfg, run_dir=str(tmp_path / "cut"), resume=True)
    rows = lambda n: [{k: v for k, v in json.loads(x).items() if k != "wall_seconds"}
                      for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
    assert rows("cut") == rows("full")  # the same loss curve, row for row
    assert resumed["final_eval_loss"] == full["final_eval_loss"]
    assert resumed["bytes_sent_per_worker"] == full["bytes_sent_per_worker"]


def test_metrics_rows_equal_a_loop_that_waits_for_each_sum(tmp_path, monkeypatch):
    """Rows are written a log interval after their sum starts, and before checkpoints:
    the same rows, in the same order, as a loop that waits for the sum at its log step."""
    from farsync.train import loop

    extra = {"train.checkpoint_every": 5, "train.log_every": 3}
    deferred = train(_run(tmp_path, "deferred", steps=16, **extra))
    log_step = loop.Trainer.log_step

    def waiting_log_step(run):
        log_step(run)
        run.metrics.land()

    monkeypatch.setattr(loop.Trainer, "log_step", waiting_log_step)
    waits = train(_run(tmp_path, "waits", steps=16, **extra))
    rows = lambda n: [{k: v for k, v in json.loads(x).items() if k != "wall_seconds"}
                      for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
    assert rows("deferred") == rows("waits")
    assert [(r["kind"], r["step"]) for r in rows("deferred") if r["kind"] != "sync"] == [
        ("train", 3), ("train", 6), ("eval", 6), ("train", 9), ("train", 12), ("eval", 12), ("train", 15),
        ("train", 16), ("eval", 16)]
    syncs = [r for r in rows("deferred") if r["kind"] == "sync"]  # one per sync, in order
    assert len(syncs) == deferred["sync_events"] and [r["step"] for r in syncs] == sorted(r["step"] for r in syncs)
    for key in ("final_train_loss", "final_eval_loss", "bytes_sent_per_worker"):
        assert deferred[key] == waits[key], key


def test_a_failed_checkpoint_write_leaves_the_last_good_one(tmp_path, monkeypatch):
    run = str(tmp_path)
    ckpt.save_worker(run, 10, 0, {"x": torch.ones(3)})
    ckpt.commit(run, 10, 1)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        ckpt.save_worker(run, 20, 0, {"x": torch.zeros(3)})
    assert ckpt.latest_step(run) == 10
    assert not os.path.exists(os.path.join(ckpt.step_dir(run, 20), "worker-0.pt"))
    assert [f for f in os.listdir(ckpt.step_dir(run, 20)) if not f.startswith(".tmp")] == []
    with pytest.raises(RuntimeError, match="lacks worker files"):
        ckpt.commit(run, 20, 1)
    assert torch.equal(ckpt.load_file(ckpt.worker_path(run, 10, 0))["x"], torch.ones(3))


@pytest.mark.parametrize("args,message", [
    (["--train.stepz=3"], "error: unknown key train.stepz; [train] has: steps,"),
    (["--train.steps=abc"], "error: train.steps must be an integer (got 'abc')"),
    (["--algo.codec=fp5"], "error: algo.codec must be one of fp32, bf16, int8, fp4-e3m0, fp4-e2m1, topk16-int2, topk16-fp4, topk16-int8, "
                         "topk32-int2, topk32-fp4, topk32-int8, topk64-int2, topk64-fp4, topk64-int8, topk128-int2, "
                         "topk128-fp4, topk128-int8 (got 'fp5')"),
    (["--data.source=/no/such/place"], "error: data.source: no such file or directory: '/no/such/place'"),
    (["--algo.inner_steps=50", "--algo.fragments=2", "--algo.sync_delay=25"],
     "error: algo.sync_delay (τ) = 25: must be < algo.inner_steps/algo.fragments = 50/2"),
    (["--algo.mixing=2"], "error: algo.mixing (α) = 2.0: must be in [0, 1], or auto"),
    (["--optim.lr=-1"], "error: optim.lr must be > 0 (got -1.0)"),
    (["--model.size=huge"], "error: model.size must be one of"),
    (["steps=3"], "error: recipe: no such file: 'steps=3'"),
    (["--algo.worker_speeds=1,0.5"], "error: algo.worker_speeds needs 4 positive numbers, one per worker (got '1,0.5')"),
    (["--algo.worker_speeds=1,a,1,1"], "error: algo.worker_speeds must be comma-separated numbers"),
    (["--algo.schedule=deadline"], "error: algo.schedule must be one of lockstep, steps, time-budget (got 'deadline')"),
    (["--algo.participation=5"], "error: algo.participation must be in [0, 4]"),
    (["--algo.aggregation=mode"], "error: algo.aggregation rule must be one of mean, trimmed-mean, median"),
    (["--train.fault=zero"], "error: train.fault must be nan, scale:FACTOR or leave:STEP (got 'zero')"),
    (["--algo.round_seconds=-1"], "error: algo.round_seconds must be >= 0 (got -1.0)"),
    ([f"--data.source={NO_TEXT}"],
     f"error: data.source: {NO_TEXT!r} line 2 has no field 'text' (data.text_field; it has: body)"),
    (["--data.text_field="], "error: data.text_field must be a non-empty field name (got '')"),
    (["--train.wandb=cloud"], "error: train.wandb must be offline, online, or empty for off (got 'cloud')"),
    (["--algo.mode=dp", "--algo.worker_speeds=1,1,1,0.5"], "error: algo.worker_speeds / algo.schedule need rounds"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    r = cli("train", f"--train.run_dir={tmp_path}", "--train.progress=false", *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_bad_recipe_key_and_empty_data_folder(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[algo]\nmode = 'streaming'\ninnersteps = 5\n")
    r = cli("train", str(recipe))
    assert r.returncode == 2 and "error: unknown key algo.innersteps" in r.stderr
    recipe.write_text("[train]\nsteps = 'ten'\n")
    r = cli("train", str(recipe))
    assert r.returncode == 2 and "error: train.steps must be an integer (got 'ten')" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("train", f"--data.source={empty}", f"--train.run_dir={tmp_path}", "--train.progress=false")
    assert r.returncode == 2 and "data.source" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_recipes_in_the_repository_are_valid():
    from farsync.train.config import load_recipe

    root = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")
    names = sorted(f for f in os.listdir(root) if f.endswith(".toml"))
    assert "default.toml" in names
    # default.toml is what runs with no recipe: the config's own defaults
    assert build_config(load_recipe(os.path.join(root, "default.toml"))) == build_config()
    for name in names:
        cfg = build_config(load_recipe(os.path.join(root, name)))
        if cfg.algo.mode != "dp":  # DiLoCo is judged after enough outer rounds: every recipe gives it ≥ 50
            assert cfg.train.steps // cfg.algo.inner_steps >= 50, name


@pytest.mark.distributed
def test_unequal_workers_with_a_faulty_one_train_and_report_per_worker(tmp_path):
    s = train(_run(tmp_path, "hetero", steps=40, **{"algo.worker_speeds": "1,0.5,1,0.25", "algo.schedule": "steps",
                                                     "train.fault": "scale:1000", "train.faulty_worker": 2}))
    w = s["per_worker"]
    assert [x["inner_steps"] for x in w] == [40, 20, 40, 10] and [x["idle_steps"] for x in w] == [0, 20, 0, 30]
    assert s["tokens"] == sum(x["tokens"] for x in w) == 110 * 4 * 64  # batch 4 x seq 64 (FAST)
    assert w[2]["rounds_excluded"] == s["sync_events"] and w[2]["rounds_joined"] == 0
    # the others join every sync they trained for (the slowest trained nothing before one final sync)
    assert all(x["rounds_joined"] + x["rounds_sat_out"] == s["sync_events"] and not x["rounds_excluded"]
               for i, x in enumerate(w) if i != 2)
    assert w[0]["rounds_joined"] == s["sync_events"]
    assert {e["worker"] for e in s["exclusions"]} == {2}
    rows = [json.loads(x) for x in (tmp_path / "hetero" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if r["kind"] == "excluded"] == [{"kind": "excluded", **e} for e in s["exclusions"]]
    syncs = [r for r in rows if r["kind"] == "sync"]  # per round: who contributed
    assert len(syncs) == s["sync_events"]
    assert all(r["excluded"] == [2] and 2 not in r["kept"] and 0 in r["kept"] for r in syncs)
    assert math.isfinite(s["final_eval_loss"]) and s["simulated_wall_seconds"] > 0
    # data-parallel would have taken all 40 steps: the baseline is not the slow workers'
    assert s["dp_equivalent_bytes_per_worker"] == 40 * round(2 * 3 / 4 * 4 * s["parameters"])
    assert [r for r in rows if r["kind"] == "train"][-1]["dp_bytes_per_worker"] == s["dp_equivalent_bytes_per_worker"]
    assert (tmp_path / "hetero" / "workers.png").exists()


def test_time_budget_in_process_trains_each_worker_its_share_by_the_deadlines(tmp_path):
    common = {"algo.worker_speeds": "1,0.5,1,0.25", "algo.inner_steps": 8}  # P = 2: a sync every 4 steps
    a = train(_run(tmp_path, "budget", steps=40, **common, **{"algo.schedule": "time-budget"}))
    b = train(_run(tmp_path, "steps", steps=40, **common, **{"algo.schedule": "steps"}))
    # a simulated worker of speed v takes 1/v steps of the fastest a step and trains while
    # a step still ends by the next sync: 8, then 4 steps a window for the fastest; for
    # v = 0.5, 4 then 2; for v = 0.25, 2 then 1 — the share of schedule steps, trained at
    # the start of each window instead of spread over it
    assert [x["inner_steps"] for x in a["per_worker"]] == [40, 20, 40, 10]
    for x, y in zip(a["per_worker"], b["per_worker"]):
        assert (x["inner_steps"], x["idle_steps"], x["tokens"]) == (y["inner_steps"], y["idle_steps"], y["tokens"])
    assert a["final_eval_loss"] != b["final_eval_loss"]
    assert a["sync_events"] == b["sync_events"]
    short = train(_run(tmp_path, "short", steps=40, **{"algo.worker_speeds": "1,0.5,1,0.2", "algo.inner_steps": 8,
                                                      "algo.schedule": "time-budget"}))
    assert [x["inner_steps"] for x in short["per_worker"]] == [40, 20, 40, 1]  # 5 > 4: fits only the first window


def test_time_budget_under_torchrun_lets_a_slow_worker_sit_out_late_steps(tmp_path):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    args = fast(tmp_path, "--algo.workers=2", "--train.steps=24", "--algo.mode=streaming", "--algo.fragments=2",
                "--algo.sync_delay=1", "--algo.worker_speeds=1,0.01", "--algo.schedule=time-budget",
                "--algo.round_seconds=1", "--train.name=budget")  # worker 1: ~1 s a step, windows of 0.25 s
    r = subprocess.run([torchrun, "--standalone", "--nproc-per-node=2", "-m", "farsync", "train", *args],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "budget" / "summary.json").read_text())
    fast_w, slow_w = s["per_worker"]
    # the round structure, not the timing: every worker goes through every schedule step,
    # trains or sits it out, and takes part in (or sits out) every sync
    for w in (fast_w, slow_w):
        assert w["inner_steps"] + w["idle_steps"] == 24 and w["inner_steps"] >= 1
        assert w["rounds_joined"] + w["rounds_sat_out"] == s["sync_events"]
    assert slow_w["inner_steps"] < fast_w["inner_steps"]
    assert s["tokens"] == (fast_w["inner_steps"] + slow_w["inner_steps"]) * 4 * 64
    r = cli("train", *args[:-1], "--algo.round_seconds=0", "--train.name=nobudget")
    assert r.returncode == 0  # in one process the clock is simulated: no budget needed


@pytest.mark.parametrize("extra", [
    [],
    # unequal speeds (worker 1 sleeps under torchrun), worker 1's pseudo-gradients scaled by 1000
    ["--algo.worker_speeds=1,0.5", "--algo.schedule=steps", "--train.fault=scale:1000"],
])
def test_torchrun_two_processes_equal_in_process_two_workers(tmp_path, extra):
    common = fast(tmp_path, "--algo.workers=2", "--train.steps=12", "--algo.mode=streaming",
                  "--algo.fragments=2", "--algo.sync_delay=1", "--algo.codec=fp4-e3m0", *extra)
    r = cli("train", *common, "--train.name=inproc")
    assert r.returncode == 0, r.stderr
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = subprocess.run([torchrun, "--standalone", "--nproc-per-node=2", "-m", "farsync", "train", *common,
                        "--train.name=torchrun"], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    a = json.loads((tmp_path / "inproc" / "summary.json").read_text())
    b = json.loads((tmp_path / "torchrun" / "summary.json").read_text())
    assert b["backend"] == "torch.distributed" and a["backend"] == "in-process"
    for key in ("final_eval_loss", "final_train_loss", "tokens", "bytes_sent_per_worker", "peak_bytes_per_sync",
                "sync_events", "dp_equivalent_bytes_per_worker", "parameters", "exclusions"):
        assert a[key] == b[key], key
    for x, y in zip(a["per_worker"], b["per_worker"]):
        assert {k: v for k, v in x.items() if not k.endswith("seconds")} == {k: v for k, v in y.items() if not k.endswith("seconds")}
    assert bool(a["exclusions"]) == bool(extra)


def test_compare_prints_runs_side_by_side_and_overlays_their_curves(tmp_path):
    a = train(_run(tmp_path, "streaming", steps=12))
    b = train(_run(tmp_path, "dp", steps=12, **{"algo.mode": "dp"}))
    r = cli("compare", str(tmp_path / "streaming"), str(tmp_path / "dp"), "--out", str(tmp_path / "c.png"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:4] == ["run", "mode", "M", "eval"]
    row = {ln.split()[0]: ln for ln in lines[2:4]}
    assert f"{a['final_eval_loss']:.4f}" in row["streaming"] and f"{b['final_eval_loss']:.4f}" in row["dp"]
    assert f"{a['dp_bytes_ratio']:,.0f}×" in row["streaming"]
    assert (tmp_path / "c.png").stat().st_size > 10_000
    from farsync.train.compare import curves, load_run

    pts = curves(*load_run(str(tmp_path / "streaming")))
    assert [p["tokens"] for p in pts] == [6 * 4 * 4 * 64, 12 * 4 * 4 * 64]  # evals at 6 and 12
    assert pts[-1]["bytes"] == max(a["bytes_sent_per_worker"]) and 0 < pts[0]["bytes"] <= pts[-1]["bytes"]
    r = cli("compare", str(tmp_path / "streaming"), str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip() == f"error: {str(tmp_path)!r} has no summary.json (not a finished farsync run)"


def test_tensorboard_and_wandb_offline_get_the_metrics_rows(tmp_path):
    s = train(_run(tmp_path, "tracked", steps=12, **{"train.tensorboard": "true", "train.wandb": "offline"}))
    rows = [json.loads(x) for x in (tmp_path / "tracked" / "metrics.jsonl").read_text().splitlines()]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "tracked" / "tensorboard"))
    ea.Reload()
    for kind, key in [("train", "train_loss"), ("train", "bytes_sent_per_worker"), ("eval", "eval_loss")]:
        got = [(e.step, e.value) for e in ea.Scalars(f"{kind}/{key}")]
        want = [(r["step"], r[key]) for r in rows if r["kind"] == kind]
        assert [g[0] for g in got] == [w[0] for w in want]
        assert all(abs(g[1] - w[1]) <= 1e-6 * max(1.0, abs(w[1])) for g, w in zip(got, want))  # stored as fp32
    runs = list((tmp_path / "tracked" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()
    assert b"eval/eval_loss" in data and b"train/train_loss" in data
    assert json.dumps(s["final_eval_loss"]).encode() in data  # the final eval loss, as logged


def test_a_missing_tracker_package_is_a_one_line_error_naming_the_extra(monkeypatch):
    import importlib.util

    from farsync.train import loggers

    real = importlib.util.find_spec
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda name, *a: None if name in ("tensorboard", "wandb") else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'farsync\[tensorboard\]'"):
        loggers.check_available(True, "")
    with pytest.raises(ValueError, match=r"train.wandb needs the wandb package: pip install 'farsync\[wandb\]'"):
        loggers.check_available(False, "offline")
    loggers.check_available(False, "")  # nothing asked, nothing needed
