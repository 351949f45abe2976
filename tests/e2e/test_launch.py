"""train.launch: farsync train starts one local process per worker (the torchrun path,
through torch's launcher) and gets the in-process simulation's numbers bit for bit; a
worker process that dies takes the run down with one line naming it; auto says what it
picked and why."""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_train_cli import FAST, cli

from farsync.train import checkpoint as ckpt
from farsync.train import launch
from farsync.train.config import build_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(300)]

RUN = [a for a in FAST if not a.startswith("--train.launch")] + ["--algo.workers=2", "--train.steps=12",
                                                                 "--algo.codec=fp4-e3m0"]


def theta_g(run_dir: str) -> list[torch.Tensor]:
    step = ckpt.latest_step(run_dir)
    return [a for f in ckpt.load_worker(run_dir, step, 0)["algo"]["anchors"] for a in f]


def test_processes_equal_the_in_process_run_bit_for_bit(tmp_path):
    runs = {}
    for how in ("processes", "inprocess"):
        r = cli("train", *RUN, f"--train.launch={how}", f"--train.run_dir={tmp_path}", f"--train.name={how}")
        assert r.returncode == 0, r.stderr
        runs[how] = (r, json.loads((tmp_path / how / "summary.json").read_text()))
    (p, procs), (_, inproc) = runs["processes"], runs["inprocess"]
    assert "launch: 2 worker processes on this machine (train.launch=processes" in p.stderr
    assert p.stdout.count("final eval loss:") == 1  # one summary, from the process the user started
    assert procs["backend"] == "torch.distributed" and inproc["backend"] == "in-process"
    for key in ("final_eval_loss", "final_train_loss", "bytes_sent_per_worker", "tokens", "sync_events"):
        assert procs[key] == inproc[key], key
    assert all(torch.equal(a, b) for a, b in zip(theta_g(str(tmp_path / "processes")), theta_g(str(tmp_path / "inprocess"))))
    rows = lambda n: [{k: v for k, v in json.loads(x).items() if k != "wall_seconds"}
                      for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
    assert rows("processes") == rows("inprocess")
    assert sorted(os.listdir(tmp_path)) == ["inprocess", "processes"]  # one run directory each


def test_a_worker_process_that_dies_stops_the_run_with_one_line(tmp_path):
    r = cli("train", *RUN, "--train.launch=processes", f"--train.run_dir={tmp_path}", "--train.name=dies",
            env={**os.environ, "FARSYNC_DIE_AT": "5:SIGKILL:1"}, timeout=120)
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: worker process 1 of 2 was killed by SIGKILL; the other workers were stopped"), r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("overrides,picked,why", [
    ([], "processes", "4 cores"),
    (["--algo.workers=1"], "inprocess", "one worker"),
    (["--algo.worker_speeds=1,1,0.5,0.5", "--algo.schedule=steps"], "inprocess", "simulated clock"),
    (["--train.launch=inprocess"], "inprocess", "train.launch=inprocess"),
])
def test_auto_picks_by_cores_and_says_why(monkeypatch, overrides, picked, why):
    monkeypatch.setattr(launch, "cores", lambda: 4)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    got, reason = launch.choose(build_config(None, overrides))
    assert got == picked and why in reason
    monkeypatch.setattr(launch, "cores", lambda: 1)
    assert launch.choose(build_config(None, []))[0] == "inprocess"
