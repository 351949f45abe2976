"""Elastic runs on torchft: real worker processes and a real Lighthouse on localhost.

A worker is SIGKILLed inside a sync (the survivors retry it without it) or mid-round,
hangs (SIGSTOP), restarts and rejoins; the survivors' θ_g is compared bit for bit with
an in-process run in which that worker's contributions stop at the same sync
(``train.fault=leave:STEP``), and with each other.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from farsync.train.config import build_config
from farsync.train import train

pytest.importorskip("torchft")
pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(300)]

CACHE = os.path.join(os.path.dirname(__file__), "..", "..", ".cache", "farsync")
TIMEOUT_S = 5  # elastic.timeout_s: a hung peer is dropped after this
# 3 workers, DiLoCo H = 5, 40 steps: syncs after steps 5, 10, ..., 40
ARGS = [
    "--model.size=nano", "--model.seq_len=64", "--data.max_bytes=1000000", "--data.val_fraction=0.1",
    "--data.vocab_size=512", "--train.batch_size=4", "--train.eval_every=100", "--train.eval_batches=2",
    "--train.log_every=5", "--train.threads=1", "--train.launch=inprocess", "--train.progress=false", "--optim.warmup_steps=2",
    f"--data.cache_dir={CACHE}", "--algo.mode=diloco", "--algo.fragments=1", "--algo.sync_delay=0",
    "--algo.inner_steps=5", "--train.steps=40", "--algo.workers=3", "--algo.exchange=all-gather",
    "--algo.codec=fp4-e3m0", "--train.name=run", "--train.checkpoint_every=10",
]


@pytest.fixture
def lighthouse(tmp_path):
    """A Lighthouse on a free port: a worker silent for 1 s is counted out; one alive
    but late to a sync is waited for (up to 60 s)."""
    p = subprocess.Popen([sys.executable, "-m", "farsync", "lighthouse", "--bind", "[::]:0", "--heartbeat-timeout-s", "1",
                          "--join-timeout-s", "60"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        addr = p.stdout.readline().strip()
        assert addr.startswith("http://"), addr
        yield addr.replace(addr.split("//")[1].split(":")[0], "localhost")
    finally:
        p.terminate()
        p.wait(10)


def start(tmp_path, lighthouse, worker, *extra, die: str = "", secret: str = ""):
    """Worker ``worker``; ``die``: the test hook FARSYNC_DIE_AT (farsync.comm.faults), STEP or STEP:SIGNAL;
    ``secret``: $FARSYNC_ELASTIC_SECRET."""
    log = open(tmp_path / f"worker-{worker}-{time.monotonic_ns()}.log", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "farsync", "train", *ARGS, f"--train.run_dir={tmp_path}", "--elastic.enabled=true",
         f"--elastic.worker={worker}", f"--elastic.lighthouse={lighthouse}", f"--elastic.timeout_s={TIMEOUT_S}",
         "--elastic.host=localhost", "--elastic.join_timeout_s=60", *extra],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", "FARSYNC_DIE_AT": die,
                                                   "FARSYNC_ELASTIC_SECRET": secret})


def finish(procs, tmp_path, timeout=180):
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
    logs = "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(tmp_path.glob("worker-*.log")))
    return logs


def rows(tmp_path, worker):
    return [json.loads(x) for x in (tmp_path / "run" / f"worker-{worker}" / "metrics.jsonl").read_text().splitlines()]


def theta_g(run_dir):
    """θ_g (every fragment's anchors) and the outer optimizer state of the last checkpoint."""
    step = json.load(open(os.path.join(run_dir, "checkpoints", "latest.json")))["step"]
    files = [f for f in os.listdir(os.path.join(run_dir, "checkpoints", f"step-{step:06d}")) if f.endswith(".pt")]
    state = torch.load(os.path.join(run_dir, "checkpoints", f"step-{step:06d}", files[0]), weights_only=True)["algo"]
    momentum = [[s["momentum_buffer"] for s in o["state"].values()] for o in state["outer_optimizers"]]
    return step, state["anchors"], momentum


def same(a, b):
    return all(torch.equal(x, y) for fx, fy in zip(a, b) for x, y in zip(fx, fy))


def reference(tmp_path, leave_step):
    """The same run in one process, worker 2 contributing nothing from the sync after
    ``leave_step`` on."""
    cfg = build_config(None, [a.lstrip("-") for a in ARGS] + [f"train.run_dir={tmp_path / 'ref'}", "train.fault=leave:"
                                                                 f"{leave_step}", "train.faulty_worker=2"])
    train(cfg)
    return theta_g(tmp_path / "ref" / "run")


def test_worker_killed_in_a_sync_survivors_equal_a_run_without_it(tmp_path, lighthouse):
    """Worker 2 dies inside the sync after step 20: the survivors' exchange fails, they
    retry it without worker 2 and finish; their θ_g equals, bit for bit, a run in which
    worker 2 contributes nothing from that sync on."""
    procs = [start(tmp_path, lighthouse, k) for k in (0, 1)] + [start(tmp_path, lighthouse, 2, die="20")]
    logs = finish(procs, tmp_path)
    assert procs[2].returncode == -signal.SIGKILL, logs
    assert procs[0].returncode == 0 and procs[1].returncode == 0, logs
    events = [r for r in rows(tmp_path, 0) if r["kind"] == "membership"]
    assert [e["event"] for e in events] == ["retry", "members"], events
    assert events[0]["round"][-1] == 20 and events[1]["lost"] == [2] and events[1]["workers"] == [0, 1]
    syncs = [r for r in rows(tmp_path, 0) if r["kind"] == "sync"]
    assert [s["kept"] for s in syncs] == [[0, 1, 2]] * 3 + [[0, 1]] * 5
    summary = json.loads((tmp_path / "run" / "worker-0" / "summary.json").read_text())
    assert summary["elastic"] == {"syncs_retried": 1, "workers_lost": 1, "workers_joined": 0, "healed": 0,
                                  "authenticated": False}
    step, anchors0, mom0 = theta_g(tmp_path / "run" / "worker-0")
    _, anchors1, mom1 = theta_g(tmp_path / "run" / "worker-1")
    ref_step, ref_anchors, ref_mom = reference(tmp_path, 20)
    assert step == ref_step == 40
    assert same(anchors0, anchors1) and same(mom0, mom1)
    assert same(anchors0, ref_anchors) and same(mom0, ref_mom)


def test_killed_worker_restarts_and_rejoins_with_identical_theta_g(tmp_path, lighthouse):
    """Worker 2 dies mid-round (step 12, after its local checkpoint at step 10), is
    restarted, takes θ_g and the outer optimizer state from a live peer over the
    network, and contributes again; at the end all three hold the same θ_g.
    elastic.min_workers = 3 holds the survivors at their next sync until it is back (so
    that they cannot finish first)."""
    three = "--elastic.min_workers=3"
    procs = [start(tmp_path, lighthouse, k, three) for k in (0, 1)]
    procs.append(start(tmp_path, lighthouse, 2, three, die="12"))
    procs[2].wait(120)
    assert procs[2].returncode == -signal.SIGKILL
    procs.append(start(tmp_path, lighthouse, 2, three))
    logs = finish([procs[0], procs[1], procs[3]], tmp_path)
    assert [p.returncode for p in (procs[0], procs[1], procs[3])] == [0, 0, 0], logs
    mine = rows(tmp_path, 2)
    rejoined = [r for r in mine if r["kind"] == "rejoined"]
    assert len(rejoined) == 1 and rejoined[0]["step"] > 12 and rejoined[0]["from_step"] == 10, logs
    back = rejoined[0]["step"]
    syncs = [r for r in rows(tmp_path, 0) if r["kind"] == "sync"]
    # every sync after the one it rejoined in has its contribution again
    assert all(2 in s["kept"] for s in syncs if s["step"] > back) and any(s["step"] > back for s in syncs)
    assert any(2 not in s["kept"] for s in syncs if 12 < s["step"] <= back)
    waits = [e for e in rows(tmp_path, 0) if e["kind"] == "membership"]
    assert waits and all(e["event"] == "retry" and "fewer than elastic.min_workers" in e["why"] for e in waits), waits
    assert [s["sat_out"] for s in syncs if s["step"] == back] == [[2]]  # it joined that sync with nothing to add
    states = [theta_g(tmp_path / "run" / f"worker-{k}") for k in range(3)]
    assert {s[0] for s in states} == {40}
    for s in states[1:]:
        assert same(states[0][1], s[1]) and same(states[0][2], s[2])
    summaries = [json.loads((tmp_path / "run" / f"worker-{k}" / "summary.json").read_text()) for k in range(3)]
    assert len({s["final_eval_loss"] for s in summaries}) == 1
    assert summaries[2]["elastic"]["healed"] == 1 and summaries[0]["elastic"]["healed"] == 0


def test_a_worker_without_the_secret_is_refused_in_syncs_and_heals(tmp_path, lighthouse):
    """Workers 0 and 1 hold the run's secret; worker 2 does not. It is refused at the
    first sync (it stops, exit code 1, one line; the others redo the sync without it),
    refused again when it comes back to be healed, and healed once it has the secret
    (elastic.secret_file): then all three finish with the same θ_g, and no sync ever
    held a contribution of the worker without the secret."""
    key = "s3cret-" * 4
    (tmp_path / "secret").write_text(key + "\n")
    three = "--elastic.min_workers=3"  # the others wait at their next sync for a third worker
    procs = [start(tmp_path, lighthouse, k, three, secret=key) for k in (0, 1)]
    intruders = []
    for _ in range(2):  # at the first sync, then at a heal
        intruders.append(start(tmp_path, lighthouse, 2, three))
        intruders[-1].wait(120)
    procs.append(start(tmp_path, lighthouse, 2, three, f"--elastic.secret_file={tmp_path / 'secret'}"))
    logs = finish(procs, tmp_path)
    assert [p.returncode for p in intruders] == [1, 1] and [p.returncode for p in procs] == [0, 0, 0], logs
    errors = [ln for f in sorted(tmp_path.glob("worker-2-*.log"))[:2] for ln in f.read_text().splitlines()
              if ln.startswith(("error", "Traceback"))]
    assert len(errors) == 2 and "this worker has none" in errors[0] and "refused this worker" in errors[1], errors
    why = [e["why"] for e in rows(tmp_path, 0) + rows(tmp_path, 1) if e["kind"] == "membership" and "why" in e]
    assert any(w.startswith("refused worker 2 in sync") for w in why), why
    assert any(w.startswith("refused worker 2 (quorum rank 2) asked for the run's state") for w in why), why
    mine = rows(tmp_path, 2)
    back = [r for r in mine if r["kind"] == "rejoined"][0]["step"]
    syncs = [r for r in rows(tmp_path, 0) if r["kind"] == "sync"]
    assert all(2 not in s["kept"] for s in syncs if s["step"] <= back) and all(2 in s["kept"] for s in syncs if s["step"] > back)
    states = [theta_g(tmp_path / "run" / f"worker-{k}") for k in range(3)]
    assert {s[0] for s in states} == {40} and all(same(states[0][1], s[1]) for s in states[1:])
    summaries = [json.loads((tmp_path / "run" / f"worker-{k}" / "summary.json").read_text()) for k in range(3)]
    assert all(s["elastic"]["authenticated"] for s in summaries) and summaries[2]["elastic"]["healed"] == 1


def test_hung_worker_is_dropped_within_the_timeout(tmp_path, lighthouse):
    """Worker 2 hangs (SIGSTOP) inside the sync after step 20: the survivors' exchange
    times out after elastic.timeout_s, they retry without it and finish."""
    procs = [start(tmp_path, lighthouse, k) for k in (0, 1)]
    hung = start(tmp_path, lighthouse, 2, die="20:SIGSTOP")
    try:
        logs = finish(procs, tmp_path)
        assert procs[0].returncode == 0 and procs[1].returncode == 0, logs
        assert hung.poll() is None  # still stopped: nobody waited for it
    finally:
        hung.kill()
        hung.wait()
    seen = [[r for r in rows(tmp_path, k) if r["kind"] == "membership"] for k in (0, 1)]
    for events in seen:
        assert [e["event"] for e in events] == ["retry", "members"], events
        assert events[0]["round"][-1] == 20 and events[1]["lost"] == [2]
        # the failed attempt ended at the collective timeout (gloo's default would be 30 min)
        assert events[0]["time"] - events[0]["failed_at"] < 3 * TIMEOUT_S
    # whoever timed out first closed its connections: the other survivor saw them close
    assert any("timed out" in events[0]["why"].lower() for events in seen), seen


def test_an_unreachable_lighthouse_is_one_line_and_exit_code_1(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "farsync", "train", *ARGS, f"--train.run_dir={tmp_path}", "--elastic.enabled=true",
         "--elastic.worker=0", "--elastic.lighthouse=http://localhost:1", "--elastic.connect_timeout_s=2",
         "--elastic.host=localhost"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: cannot reach the lighthouse at http://localhost:1 (elastic.lighthouse)"), r.stderr
    assert "Traceback" not in r.stderr
