"""A client site's relay (the ClientApp Flower starts per message; no torch) and its
long-lived trainer, over the real local channel (a Unix socket with an authkey), in one
test process: the trainers serve from threads, the server loop is run_server's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from multiprocessing import AuthenticationError
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("flwr")

from farsync.federated import channel  # noqa: E402
from farsync.federated.core import simulate_federation  # noqa: E402
from farsync.federated.flower import relay, seconds_left  # noqa: E402
from farsync.federated.trainer import SiteTrainer  # noqa: E402
from farsync.train.config import build_config, to_toml  # noqa: E402

CACHE = os.path.join(os.path.dirname(__file__), "..", "..", ".cache", "farsync")
FAST = ["--model.size=nano", "--model.seq_len=64", "--data.max_bytes=1000000", "--data.val_fraction=0.1",
        f"--data.cache_dir={CACHE}", "--train.batch_size=4", "--algo.inner_steps=4", "--algo.sync_delay=0",
        "--optim.warmup_steps=2", "--train.threads=1", "--train.eval_every=100", "--train.eval_batches=1"]
STREAMING = ["--algo.mode=streaming", "--algo.fragments=2"]


class Site:
    """A trainer serving from a thread; :meth:`restart` ends it (its memory is gone) and
    starts a new one on the same state folder, as a crashed trainer started again."""

    def __init__(self, state_dir: str, client: int):
        self.state_dir, self.client = state_dir, client
        self.start()

    def start(self):
        self.trainer = SiteTrainer(self.state_dir, self.client)
        self.thread = threading.Thread(target=self.trainer.serve, daemon=True)
        self.thread.start()

    def stop(self):
        self.trainer.stop()
        self.thread.join()

    def restart(self):
        self.stop()
        self.start()


class RelayGrid:
    """Flower's Grid for run_server: node 10 + c is client c, whose every message goes
    through :func:`relay` to its site's trainer; before round ``restart_at`` client 0's
    trainer is started again. Records client 0's saved data position after each round."""

    def __init__(self, cfg, sites, restart_at: int):
        self.cfg, self.sites, self.restart_at = cfg, sites, restart_at
        self.replies, self.sent, self.saved_position = {}, 0, []

    def get_node_ids(self):
        return [10 + c for c in self.sites]

    def push_messages(self, messages):
        from farsync.train.checkpoint import load_file

        ids = []
        for m in messages:
            self.sent += 1
            i, c = f"m{self.sent}", m.node - 10
            site = self.sites[c]
            if c == 0 and int(m.group) == self.restart_at:
                site.restart()
            node = {"client": c, "state-dir": site.state_dir}
            out = relay(m.content, node, {"farsync-config": to_toml(self.cfg)}, 7, m.ttl)
            if c == 0:
                path = os.path.join(site.state_dir, "run-7", "client-0.pt")
                self.saved_position.append(load_file(path, keys=("position",))["position"])
            self.replies[i] = SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i),
                                              has_error=lambda: False, content=out)
            ids.append(i)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in ids if i in self.replies]

    @staticmethod
    def message(content, node, group, ttl):
        return SimpleNamespace(content=content, node=node, group=group, ttl=ttl)


def test_relayed_rounds_equal_the_simulation_and_a_restarted_trainer_continues_from_its_saved_state(tmp_path):
    """Streaming, two fragments (θ_m lives on between rounds), two sites: a trainer keeps
    its Client in memory across rounds; client 0's trainer is started again before round 2
    and goes on from the state saved after round 1. θ_g equals the in-process federation
    (a Client rebuilt from disk every round), bit for bit."""
    from farsync.federated.rounds import run_server

    cfg = build_config(None, [*FAST, *STREAMING, "--algo.workers=2", "--train.steps=12", "--federated.min_clients=2"])
    sites = {c: Site(str(tmp_path / f"site-{c}"), c) for c in (0, 1)}
    try:
        grid = RelayGrid(cfg, sites, restart_at=2)
        run_server(grid, cfg, str(tmp_path / "run"), new_message=RelayGrid.message)
        built = {c: s.trainer.built for c, s in sites.items()}
    finally:
        for s in sites.values():
            s.stop()
    sim = simulate_federation(cfg, str(tmp_path / "sim"), rounds=3, log=lambda m: None)
    assert torch.equal(torch.load(tmp_path / "run" / "theta.pt"), sim.model.theta)
    steps = [p.steps for p in sim.plan]
    assert len(steps) == 5 and grid.sent == 10
    # saved after every round: the data position on disk is the steps trained so far
    assert grid.saved_position == [sum(steps[: r + 1]) for r in range(5)]
    # one Client per trainer for all its rounds: site 1's all five, site 0's new trainer rounds 2-4
    assert built == {0: 1, 1: 1}


def test_a_relay_with_no_trainer_says_so_in_one_line(tmp_path):
    import socket

    node = {"client": 3, "state-dir": str(tmp_path)}
    run_config = {"farsync-config": ""}
    with pytest.raises(channel.NoTrainer) as e:
        relay(None, node, run_config, 1, 5.0)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("no farsync trainer for client 3")
    assert f"farsync federate client --client 3 --state-dir {tmp_path}" in msg
    # a trainer that died: its key and socket file are left, nothing listens
    (tmp_path / "trainer-3.key").write_bytes(b"k" * 32)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(channel.socket_path(str(tmp_path), 3))
    s.close()
    with pytest.raises(channel.NoTrainer, match=f"listens on {tmp_path}/trainer-3.sock: start this site with"):
        relay(None, node, run_config, 1, 5.0)
    # and a new trainer takes the place of the dead one's socket
    site = Site(str(tmp_path), 3)
    try:
        assert channel.ping(str(tmp_path), 3, 5.0)["client"] == 3
        with pytest.raises(RuntimeError, match="a trainer for client 3 already listens"):
            SiteTrainer(str(tmp_path), 3)
    finally:
        site.stop()


def test_a_trainer_refuses_a_wrong_key_answers_errors_in_one_line_and_serves_on(tmp_path):
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    d = str(tmp_path)
    site = Site(d, 0)
    try:
        key = channel.key_path(d, 0)
        good = open(key, "rb").read()
        assert os.stat(key).st_mode & 0o777 == 0o600
        with open(key, "wb") as f:
            f.write(os.urandom(32))
        with pytest.raises(AuthenticationError, match="refused this relay's key"):
            channel.ping(d, 0, 5.0)
        with open(key, "wb") as f:
            f.write(good)
        cfg = build_config(None, [*FAST, "--algo.workers=2"])
        work = {"round": 3, "start": 12, "steps": 4, "fragments": [0], "total_rounds": 4, "deltas": [],
                "delta_fragments": [], "skipped": [], "full": False, "version": -1}
        content = RecordDict({"work": ConfigRecord(work), "downlink": ArrayRecord({})})
        run_config = {"farsync-config": to_toml(cfg)}
        # a client that holds round 0 cannot train round 3 without its downlink: the message's error
        with pytest.raises(RuntimeError) as e:
            relay(content, {"client": 0, "state-dir": d}, run_config, 1, 30.0)
        assert "\n" not in str(e.value) and "client 0: at round 0 after the downlink, expected 3" in str(e.value)
        assert site.trainer.current is None  # the next message starts from the saved state
        with pytest.raises(RuntimeError, match="this trainer trains client 0; the message is for client 1"):
            channel.request(d, 0, {"kind": "train", "client": 1, "run": 1, "config": "", "started": 0.0}, None, 30.0)
        assert channel.ping(d, 0, 5.0)["client"] == 0
    finally:
        site.stop()


def test_no_wait_is_longer_than_the_round_s_deadline(tmp_path):
    """A trainer that never takes the message, and one that takes it and never answers:
    the relay gives up at the deadline it was given, saying which."""
    d = str(tmp_path)
    idle = channel.listen(d, 4)  # listens, never accepts
    try:
        with pytest.raises(TimeoutError, match=r"did not take the message within 0.2 s \(the round's deadline\)"):
            channel.ping(d, 4, 0.2)
        held = []

        def hold():  # accepts (the handshake; the first, given-up connection fails it), then never answers
            while not held:
                try:
                    held.append(idle.accept())
                except (EOFError, ConnectionError, AuthenticationError):
                    pass

        t = threading.Thread(target=hold, daemon=True)
        t.start()
        with pytest.raises(TimeoutError, match=r"reply of client 4's trainer did not come by the round's deadline"):
            channel.ping(d, 4, 0.3)
        t.join()
    finally:
        idle.close()
    # the message's deadline, or its TTL when the sites' clocks disagree
    assert seconds_left(created_at=100.0, ttl=30.0, now=110.0) == 20.0
    assert seconds_left(created_at=100.0, ttl=30.0, now=200.0) == 30.0
    assert seconds_left(created_at=100.0, ttl=30.0, now=50.0) == 30.0


def test_the_relay_does_not_import_torch(tmp_path):
    """The ClientApp's module and its whole path (a round trained by a trainer in this
    process, the reply back) in a fresh interpreter: torch never loaded there."""
    d = str(tmp_path)
    cfg = build_config(None, [*FAST, "--algo.workers=2"])
    (tmp_path / "cfg.toml").write_text(to_toml(cfg))
    script = f"""
import json, sys
from farsync.federated import flower
flower.make_client_app()
flower.make_server_app()
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
work = {{"round": 0, "start": 0, "steps": 2, "fragments": [0], "total_rounds": 3, "deltas": [],
        "delta_fragments": [], "skipped": [], "full": False, "version": -1}}
out = flower.relay(RecordDict({{"work": ConfigRecord(work), "downlink": ArrayRecord({{}})}}),
                   {{"client": 1, "state-dir": {d!r}}}, {{"farsync-config": open({str(tmp_path / 'cfg.toml')!r}).read()}},
                   5, 60.0)
info = out.metric_records["info"]
print(json.dumps({{"torch": "torch" in sys.modules, "round": info["round"], "trained": info["trained"],
                  "payload": len(out.array_records["update"]["delta-0"].data)}}))
"""
    site = Site(d, 1)
    try:
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    finally:
        site.stop()
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["torch"] is False
    assert got["round"] == 0 and got["trained"] == 2 * 4 * 64 and got["payload"] > 0


def _frozen_peer(path: str):
    """A connection to ``path`` that never reads nor writes."""
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def test_a_busy_trainer_is_alive_to_a_second_one_and_a_late_relay_says_so_in_one_line(tmp_path):
    """A trainer whose accept queue is full (it trains, relays wait): a second trainer is
    told at once that one listens, and its key stays the live one's; a relay gives up at
    its deadline in the one-line message."""
    import socket

    d = str(tmp_path)
    busy = channel.listen(d, 5)  # never accepts
    queued = []
    try:
        key = open(channel.key_path(d, 5), "rb").read()
        assert os.stat(channel.key_path(d, 5)).st_mode & 0o777 == 0o600
        while len(queued) <= 2 * channel.BACKLOG + 2:  # until the kernel says the queue is full
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            queued.append(s)
            try:
                s.connect(channel.socket_path(d, 5))
            except BlockingIOError:
                break
        else:
            pytest.fail("the queue never filled")
        with pytest.raises(RuntimeError, match="a trainer for client 5 already listens"):
            channel.listen(d, 5)
        assert open(channel.key_path(d, 5), "rb").read() == key  # written by the one that bound only
        assert sorted(os.listdir(d)) == ["trainer-5.key", "trainer-5.sock"]  # no temporary key left
        with pytest.raises(TimeoutError, match=r"did not take the message within 0.2 s \(the round's deadline\)"):
            channel.ping(d, 5, 0.2)
    finally:
        for s in queued:
            s.close()
        busy.close()


def test_a_frozen_peer_holds_neither_the_trainer_nor_the_relay(tmp_path, monkeypatch):
    """A connection that never answers the trainer's challenge is dropped after
    HANDSHAKE_S, and the next relay is served; a 'trainer' that stops in the middle of the
    handshake costs a relay its deadline, no more."""
    from multiprocessing.connection import deliver_challenge

    d = str(tmp_path)
    monkeypatch.setattr(channel, "HANDSHAKE_S", 0.2)
    site = Site(d, 0)
    try:
        frozen = _frozen_peer(channel.socket_path(d, 0))
        assert channel.ping(d, 0, 5.0)["client"] == 0
        frozen.close()
    finally:
        site.stop()
    fake = channel.listen(d, 6)
    key = open(channel.key_path(d, 6), "rb").read()
    held = []

    def half():  # checks the relay's key, then never sends its own answer
        conn = fake._listener.accept()
        deliver_challenge(conn, key)
        held.append(conn)

    t = threading.Thread(target=half, daemon=True)
    t.start()
    try:
        with pytest.raises(TimeoutError, match=r"did not take the message within 0.3 s"):
            channel.ping(d, 6, 0.3)
        t.join()
    finally:
        for c in held:
            c.close()
        fake.close()


def _answer_with(d: str, client: int, raw: bytes):
    """A 'trainer' for ``client`` that takes one message and answers ``raw`` (then closes)."""
    fake = channel.listen(d, client)

    def serve():
        with fake.accept(5.0) as conn:
            channel.receive(conn, time.time() + 5.0, "the request")
            os.write(conn.fileno(), raw)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return fake, t


def test_a_reply_that_is_not_farsync_s_frames_is_one_line(tmp_path):
    """The last frame must be a RecordDict; a trainer gone in the middle of a frame is the
    one-line 'closed the channel', not an OSError."""
    import struct

    from flwr.app import ConfigRecord

    d = str(tmp_path)

    def framed(b: bytes) -> bytes:
        return struct.pack("!i", len(b)) + b

    not_root = ConfigRecord({"a": 1}).deflate()
    for raw, match in [(framed(json.dumps({"objects": 1}).encode()) + framed(not_root),
                        "client 7's trainer answered frames that are not farsync's: .*last frame is not a RecordDict"),
                       (framed(b"[1]"), "not farsync's: .*header is not farsync's"),
                       (framed(json.dumps({"objects": 1}).encode()) + struct.pack("!i", 100) + b"x" * 10,
                        "the trainer for client 7 closed the channel before replying")]:
        fake, t = _answer_with(d, 7, raw)
        try:
            with pytest.raises(RuntimeError, match=match) as e:
                channel.ping(d, 7, 5.0)
            assert "\n" not in str(e.value)
            t.join()
        finally:
            fake.close()


def test_the_client_command_leaks_no_trainer(tmp_path, monkeypatch):
    """A trainer is not started once stop() has run (a restart racing the end), and a
    trainer `client` started ends by itself when that process is gone."""
    from farsync.cli import federate
    from farsync.federated import launch

    monkeypatch.setattr(launch, "trainer_cmd", lambda *a: [sys.executable, "-c", "import time; time.sleep(30)"])
    monkeypatch.setattr(launch, "wait_trainer", lambda *a, **k: None)
    t = federate._Trainer(0, str(tmp_path))
    t.stop()
    t._spawn()
    assert t.proc is None
    # a trainer whose parent is gone (here: never its parent) sends itself SIGTERM
    script = ("import signal, sys, time\n"
              "signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))\n"
              "from farsync.cli.federate import exit_with_parent\n"
              "exit_with_parent(-1, interval_s=0.01)\n"
              "time.sleep(30)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert r.returncode == 7, r.stderr
