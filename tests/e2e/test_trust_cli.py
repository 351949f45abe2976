"""`farsync train` and `farsync export` lose nothing a user made and run nothing a file
holds (issue 24): a reused run name, a resume with overrides, a killed run, a checkpoint
that would run code, a run that produced nothing usable, a lost torchrun worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_train_cli import cli, fast

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "unit"))
from test_trust import evil_file  # noqa: E402


def one_line(r, code=2, *, last=False):
    """The one error line of a finished command (``last``: its last line; the lines
    before it are progress)."""
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    err = r.stderr.strip()
    assert "Traceback" not in err and (last or len(err.splitlines()) == 1), err
    return err.splitlines()[-1]


def run(*args):
    """`farsync ARGS` in this process (no interpreter start-up); a CompletedProcess."""
    from typer.testing import CliRunner

    from farsync.cli.main import app

    r = CliRunner().invoke(app, list(args))
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


def in_process(tmp_path, *extra):
    from farsync.train import train
    from farsync.train.config import build_config

    return train(build_config(None, [a.lstrip("-") for a in fast(tmp_path, *extra)]))


def rows(path):
    return [{k: v for k, v in json.loads(x).items() if k not in ("wall_seconds", "time")}
            for x in open(path).read().splitlines()]


def test_a_reused_run_name_is_refused_and_overwrite_replaces_it(tmp_path):
    args = ["--train.steps=4", "--train.name=run", "--algo.mode=diloco", "--algo.fragments=1", "--algo.sync_delay=0"]
    in_process(tmp_path, *args)
    run_dir = tmp_path / "run"
    before = {p: (run_dir / p).read_bytes() for p in ("summary.json", "metrics.jsonl", "config.toml")}
    err = one_line(run("train", *fast(tmp_path, *args, "--optim.lr=0.001")))
    assert err == (f"error: {run_dir} already holds a finished run: resume it with --resume {run_dir}, choose another "
                   "train.name, or pass --train.overwrite=true to replace it")
    assert {p: (run_dir / p).read_bytes() for p in before} == before  # nothing of it touched
    err = one_line(run("train", *fast(tmp_path, "--train.steps=4", "--train.name=../../x")))
    assert "train.name must be a plain folder name under train.run_dir, not a path (got '../../x')" in err
    (run_dir / "stale.txt").write_text("mine")  # not a run's file: kept
    r = run("train", *fast(tmp_path, *args, "--optim.lr=0.001", "--train.overwrite=true"))
    assert r.returncode == 0, r.stderr
    assert (run_dir / "summary.json").read_bytes() != before["summary.json"] and (run_dir / "stale.txt").exists()
    assert "overwrite" not in (run_dir / "config.toml").read_text()  # a saved config never replaces a run


def test_a_killed_short_run_resumes_from_half_way_with_its_rows_once(tmp_path):
    """checkpoint_every (520) longer than the run: a checkpoint half-way (step 6). Killed
    at step 9, a sync sent at step 6 landed (and was written) after that checkpoint; the
    resumed run writes it once, and equals the uninterrupted run row for row."""
    common = ["--train.steps=12", "--algo.mode=streaming", "--algo.fragments=2", "--algo.sync_delay=1",
              "--train.eval_every=100", "--train.checkpoint_every=520"]
    full = in_process(tmp_path, *common, "--train.name=full")
    r = cli("train", *fast(tmp_path, *common, "--train.name=cut"), env={"FARSYNC_DIE_AT": "9"})
    assert r.returncode == -9, r.stderr[-2000:]
    cut = tmp_path / "cut"
    assert json.load(open(cut / "checkpoints" / "latest.json"))["step"] == 6
    config = (cut / "config.toml").read_bytes()
    # overrides that would change the run are refused before anything is written
    for override, key in [("--algo.inner_steps=10", "algo.inner_steps 4 -> 10"), ("--algo.workers=3", "algo.workers"),
                          ("--train.steps=32", "train.steps 12 -> 32")]:
        err = one_line(run("train", "--resume", str(cut), override))
        assert f"error: --resume {cut} continues the run as it was: it cannot change {key}" in err
        assert (cut / "config.toml").read_bytes() == config
    r = run("train", "--resume", str(cut), "--train.keep_checkpoints=3", "--train.progress=false")
    assert r.returncode == 0, r.stderr[-2000:]
    assert rows(cut / "metrics.jsonl") == rows(tmp_path / "full" / "metrics.jsonl")
    resumed = json.load(open(cut / "summary.json"))
    assert resumed["final_eval_loss"] == full["final_eval_loss"]
    assert resumed["bytes_sent_per_worker"] == full["bytes_sent_per_worker"]
    assert (cut / "config.toml").read_bytes() == config
    assert "the run is finished" in one_line(run("train", "--resume", str(cut)))


def test_export_refuses_a_checkpoint_that_would_run_code_and_existing_outputs(tmp_path):
    pytest.importorskip("transformers")
    in_process(tmp_path, "--train.steps=8", "--train.name=run")
    run_dir, marker = tmp_path / "run", tmp_path / "ran"
    newest = run_dir / "checkpoints" / "step-000008" / "worker-0.pt"
    evil_file(str(newest), marker)
    r = run("export", str(run_dir), str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    assert f"{newest}: holds Python objects" in r.stderr and "resuming from step 4" in r.stderr
    assert "step 4 of" in r.stdout and not marker.exists()
    older = run_dir / "checkpoints" / "step-000004" / "worker-0.pt"
    evil_file(str(older), marker)
    err = one_line(run("export", str(run_dir), str(tmp_path / "hf2")))
    assert "no usable checkpoint" in err and str(newest) in err and str(older) in err
    assert not marker.exists() and not (tmp_path / "hf2").exists()
    (tmp_path / "file").write_text("mine")
    err = one_line(run("export", str(run_dir), str(tmp_path / "file")))
    assert err == f"error: export: {str(tmp_path / 'file')!r} is a file, not a folder: give a folder to write the model into"
    err = one_line(run("export", str(run_dir), str(tmp_path / "hf")))
    assert "is not empty" in err and "--overwrite" in err
    assert (tmp_path / "file").read_text() == "mine"


def test_a_run_whose_every_round_was_skipped_exits_1_with_its_summary(tmp_path):
    r = run("train", *fast(tmp_path, "--train.steps=8", "--train.name=run", "--algo.min_contributions=5"))
    err = one_line(r, code=1, last=True)
    assert err.startswith("error: every round of the run was skipped (4 of 4")
    s = json.load(open(tmp_path / "run" / "summary.json"))
    assert s["failure"] == err.removeprefix("error: ") and "final eval loss" in r.stdout


def test_a_non_finite_final_eval_loss_is_a_failure(tmp_path, monkeypatch):
    from farsync.train.loop import Trainer

    monkeypatch.setattr(Trainer, "eval_loss", lambda self: float("nan"))
    s = in_process(tmp_path, "--train.steps=4", "--train.name=nan")
    assert s["failure"].startswith("the final eval loss is nan: training diverged")
    assert json.load(open(tmp_path / "nan" / "summary.json"))["failure"] == s["failure"]


@pytest.mark.distributed
def test_a_lost_torchrun_worker_is_one_line_and_exit_code_1(tmp_path):
    """Two processes as torchrun starts them on two machines; worker 1 is killed at step 3."""
    args = [sys.executable, "-m", "farsync", "train", *fast(tmp_path, "--algo.workers=2", "--train.steps=40",
                                                             "--train.name=run", "--train.checkpoint_every=4")]
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    p0 = subprocess.Popen(args, env={**env, "RANK": "0", "LOCAL_RANK": "0"}, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    p1 = subprocess.run(args, env={**env, "RANK": "1", "LOCAL_RANK": "1", "FARSYNC_DIE_AT": "3"}, capture_output=True,
                        text=True, timeout=240)
    out, err = p0.communicate(timeout=240)
    assert p1.returncode == -9
    r = subprocess.CompletedProcess(args, p0.returncode, out, "\n".join(
        x for x in err.splitlines() if x.startswith(("error", "Traceback", "[rank"))))
    err = one_line(r, code=1)
    assert err.startswith("error: lost the other workers (Connection ") and "by peer" in err
    assert f"--resume {tmp_path / 'run'}" in err
