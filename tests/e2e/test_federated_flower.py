"""Federated runs on Flower's deployment runtime, on this machine: a SuperLink with TLS and
client keys, SuperNodes, farsync's ServerApp and ClientApp (real processes, real messages)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("flwr")

from farsync.federated.core import simulate_federation  # noqa: E402
from farsync.federated.demo import Federation  # noqa: E402
from farsync.train.config import build_config  # noqa: E402

CACHE = os.path.join(os.path.dirname(__file__), "..", "..", ".cache", "farsync")
FAST = ["--model.size=nano", "--model.seq_len=64", "--data.max_bytes=1000000", "--data.val_fraction=0.1",
        f"--data.cache_dir={CACHE}", "--train.batch_size=4", "--algo.inner_steps=4", "--algo.mode=diloco",
        "--algo.fragments=1", "--algo.sync_delay=0", "--optim.warmup_steps=2", "--train.eval_every=8",
        "--train.eval_batches=2", "--train.threads=1"]


def test_a_federation_trains_exactly_the_in_process_schedule_and_refuses_unregistered_clients(tmp_path):
    cfg = build_config(None, [*FAST, "--algo.workers=2", "--train.steps=12", "--federated.min_clients=2",
                              "--federated.round_timeout_s=120"])
    fed = Federation(str(tmp_path / "run"), port=18310)
    try:
        fed.add_client(0)
        fed.add_client(1)
        # a site whose key was never registered is turned away, with a line that says so
        key = os.path.join(fed.base, "keys", "stranger")
        from farsync.federated.launch import make_client_key

        make_client_key(key)
        r = subprocess.run([sys.executable, "-m", "farsync", "federate", "client", "--client", "1", "--superlink",
                            fed.address, "--ca", fed.ca, "--key", key, "--state-dir", str(tmp_path / "x"),
                            "--port", "19299", "--retry-s", "0"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "FARSYNC_HOME": str(tmp_path / "home")})
        assert r.returncode == 2
        assert "the SuperLink refused this client" in r.stderr and "not registered" in r.stderr
        fed.start(cfg)
        summary = fed.wait(300)
    finally:
        fed.stop()
    rows = [json.loads(x) for x in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [row["kept"] for row in rows] == [[0, 1]] * 3
    assert summary["rounds"] == 3 and {c["id"] for c in summary["clients"]} == {0, 1}
    # bytes both ways: θ_g in full once (fp32), then one encoded mean per round; Δ up every round
    for c in summary["clients"]:
        assert c["rounds_joined"] == 3 and c["tokens"] == 3 * 4 * 4 * 64
        assert c["bytes_up"] == 3 * rows[0]["bytes_up"][str(c["id"])]
    down = [row["bytes_down"]["0"] for row in rows]
    assert down[0] > 4 * 90_000 and down[1] == down[2] == rows[0]["bytes_up"]["0"]
    # the same seeds in one process: the same θ_g, bit for bit
    sim = simulate_federation(cfg, str(tmp_path / "sim"), rounds=3, log=lambda m: None)
    assert torch.equal(torch.load(tmp_path / "run" / "theta.pt"), sim.model.theta)


def test_a_client_killed_mid_round_is_left_out_then_rejoins_and_contributes(tmp_path):
    cfg = build_config(None, [*FAST, "--algo.workers=3", "--train.steps=24", "--federated.min_clients=2",
                              "--federated.round_timeout_s=25", "--federated.cooldown_s=1"])
    # without client keys: a restarted SuperNode is a new node at once (with keys, the SuperLink
    # admits the same key again once it has counted the old one out, ~60 s)
    fed = Federation(str(tmp_path / "run"), port=18320, secure=False)
    rows_path = tmp_path / "run" / "rounds.jsonl"
    try:
        for c in range(3):
            fed.add_client(c)
        fed.start(cfg)
        while not (rows_path.exists() and rows_path.read_text().count("\n") >= 1):
            time.sleep(0.1)
        fed.kill_client(2)  # round 2 under way: its message is out, its reply never comes
        while rows_path.read_text().count("\n") < 2:
            time.sleep(0.1)
        fed.add_client(2)  # restarted: a new SuperNode, its state folder as it left it
        summary = fed.wait(400)
    finally:
        fed.stop()
    rows = [json.loads(x) for x in rows_path.read_text().splitlines()]
    assert len(rows) == 6 and rows[0]["kept"] == [0, 1, 2]
    assert rows[1]["kept"] == [0, 1] and len(rows[1]["failed"]) == 1  # that round completed without it
    back = [i for i, row in enumerate(rows) if i > 1 and 2 in row["kept"]]
    assert back, rows  # it rejoined and contributed again
    first = rows[back[0]]
    assert first["bytes_down"]["2"] > 4 * 90_000  # it was sent θ_g in full (the server forgot what it held)
    assert {c["id"]: c["rounds_joined"] for c in summary["clients"]}[2] == 1 + len(back)
    assert summary["final_eval_loss"] == summary["final_eval_loss"]  # finite, not NaN
