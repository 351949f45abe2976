"""Federated rounds in one process (farsync.federated.core): robust aggregation at the
server, the downlink that catches a client up exactly, seeded sampling, config errors."""

from __future__ import annotations

import os

import pytest
import torch

from farsync.algorithms.outer import sample_participants
from farsync.federated.core import Client, GlobalModel, Server, simulate_federation
from farsync.train.config import ConfigError, build_config

CACHE = os.path.join(os.path.dirname(__file__), "..", "..", ".cache", "farsync")
FAST = ["--model.size=nano", "--model.seq_len=64", "--data.max_bytes=1000000", "--data.val_fraction=0.1",
        f"--data.cache_dir={CACHE}", "--train.batch_size=4", "--algo.inner_steps=4", "--algo.mode=diloco",
        "--algo.fragments=1", "--algo.sync_delay=0", "--optim.warmup_steps=2", "--train.steps=16", "--train.threads=1", "--train.launch=inprocess"]


def _cfg(*extra):
    return build_config(None, [*FAST, *extra])


@pytest.mark.parametrize("fault", ["nan", "scale:1000"])
def test_a_client_sending_nan_or_a_huge_update_is_excluded_and_the_model_is_unharmed(tmp_path, fault):
    cfg = _cfg("--algo.workers=3")
    bad = simulate_federation(cfg, str(tmp_path / "bad"), rounds=3, fault=fault, faulty_client=2, log=lambda m: None)
    assert all(row["kept"] == [0, 1] and [c for c, _ in row["excluded"]] == [2] for row in bad.history)
    # the same federation without that client: the same θ_g, bit for bit
    clean = simulate_federation(cfg, str(tmp_path / "clean"), rounds=3, online=lambda r: [0, 1], log=lambda m: None)
    assert torch.equal(bad.model.theta, clean.model.theta)
    assert torch.isfinite(bad.model.theta).all()


STREAMING = ["--algo.mode=streaming", "--algo.fragments=2", "--algo.sync_delay=0"]


@pytest.mark.parametrize("fragments", [1, 2])
def test_clients_that_miss_rounds_catch_up_exactly_by_deltas_or_in_full(tmp_path, fragments):
    cfg = _cfg("--algo.workers=3", "--algo.participation=1", *(STREAMING if fragments == 2 else []))
    server = simulate_federation(cfg, str(tmp_path), rounds=4, log=lambda m: None)
    n = len(server.history)
    assert n == {1: 4, 2: 7}[fragments]  # P = 2: a sync every H/2 steps after the first H
    assert [len(r["sampled"]) for r in server.history] == [1] * n
    sampled = [r["sampled"][0] for r in server.history]
    assert sampled == [sample_participants(1, [0, 1, 2], cfg.train.seed, 0, r)[0] for r in range(n)]
    from farsync.data import Corpus

    corpus = Corpus.build(cfg.data, log=lambda m: None)
    for c in range(3):  # each client brought to the server's θ_g by the work it would get next
        work = server.work_for(c)
        client = Client(cfg, c, os.path.join(str(tmp_path), "clients"), corpus)
        client.catch_up(work)
        assert torch.equal(client.global_model.theta, server.model.theta)
        if c in sampled:
            assert work.full is None and work.deltas  # replayed the rounds it missed
            assert work.downlink_bytes() < server.model.theta.numel() * 4
        else:
            assert work.full is not None  # never took part: θ_g in full


def test_a_client_further_behind_than_the_server_keeps_gets_theta_in_full():
    theta = torch.zeros(64)
    agg = _cfg().algo.make_aggregation()
    s = Server(theta, rounds=5, steps=1, codec="fp32", outer_lr=0.7, outer_momentum=0.8, aggregation=agg, keep_rounds=2)
    from farsync.federated.core import Reply

    first = s.work_for(0)
    assert first.full is not None
    for r in range(4):
        s.work_for(1)
        s.finish_round({1: Reply(1, r, [s.codecs[0].encode(torch.full((64,), 0.1 * (r + 1)))], [10], 10, 0.0)}, [1])
    w = s.work_for(0)  # holds round 0; the server kept rounds 2 and 3 only
    assert w.full is not None and not w.deltas
    g = GlobalModel(torch.zeros(64), outer_lr=0.7, outer_momentum=0.8)
    g.load_state_dict(w.full)
    assert torch.equal(g.theta, s.model.theta) and g.version == 4
    s.forget(1)
    assert s.work_for(1).full is not None  # a client that went silent is sent θ_g in full


@pytest.mark.parametrize("overrides,message", [
    (["--federated.round_timeout_s=0"], "federated.round_timeout_s"),
    (["--federated.min_clients=0"], "federated.min_clients"),
    (["--federated.keep_rounds=0"], "federated.keep_rounds"),
    (["--federated.cooldown_s=-1"], "federated.cooldown_s"),
    (["--federated.deadline_factor=0.5"], r"federated.deadline_factor must be 0 \(off\) or >= 1 \(got 0.5\)"),
    (["--federated.deadline_floor_s=-1"], r"federated.deadline_floor_s must be >= 0.0 \(got -1.0\)"),
    (["--federated.deadline_window=0"], r"federated.deadline_window must be >= 1 \(got 0\)"),
])
def test_federated_settings_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config(None, overrides)


@pytest.mark.parametrize("spans", [None, [[(0, 32), (64, 32)], [(32, 32)]]])
def test_a_server_restarted_from_its_checkpoint_continues_exactly(tmp_path, spans):
    """Also with two fragments (one of them two runs of the vector): each its outer
    optimizer and its downlink residual, the log of (round, fragment) means."""
    from farsync.federated.core import Reply

    agg = _cfg().algo.make_aggregation()

    def server():
        return Server(torch.zeros(96), rounds=4, steps=2, codec="fp4-e3m0", outer_lr=0.7, outer_momentum=0.8,
                      aggregation=agg, keep_rounds=2, error_feedback=True, spans=spans)

    def play(s, rounds):
        for r in rounds:
            for c in (0, 1):
                s.work_for(c)
            g = torch.Generator().manual_seed(r)
            frags = s.plan[r].fragments
            s.finish_round({c: Reply(c, r, [s.codecs[f].encode(torch.randn(s.codecs[f].numel, generator=g) * (c + 1))
                                            for f in frags], [10 + c] * len(frags), 10 + c, 0.0)
                            for c in (0, 1)}, [0, 1])

    a = server()
    n = a.rounds
    assert n == (4 if spans is None else 7)
    play(a, range(n))
    b = server()
    play(b, range(2))
    b.save(str(tmp_path / "server.pt"))
    c = server()
    c.load_state_dict(torch.load(tmp_path / "server.pt", weights_only=True))
    assert c.held == {0: 1, 1: 1} and sorted(c.log) == [0, 1]
    play(c, range(2, n))
    assert torch.equal(a.model.theta, c.model.theta) and a.history == c.history
    assert all(x is not None and torch.equal(x, y) for x, y in zip(a.residuals, c.residuals))
    assert c.work_for(0).deltas == a.work_for(0).deltas  # the same means kept for catching up


def test_no_round_starts_while_every_online_client_is_cooling_down():
    import time

    from farsync.federated.rounds import _wait_for_clients

    class Grid:
        def get_node_ids(self):
            return [7, 9]

    cooling = {7: time.time(), 9: time.time()}  # both just missed a deadline
    t0 = time.time()
    assert _wait_for_clients(Grid(), 2, 30, cooling, cooldown_s=0.6) == [7, 9]
    assert time.time() - t0 >= 0.5 and cooling == {}
    cooling = {7: time.time()}
    assert _wait_for_clients(Grid(), 2, 30, cooling, cooldown_s=60) == [9]  # the other one may train
    with pytest.raises(RuntimeError, match="federated.min_clients is 3"):
        _wait_for_clients(Grid(), 3, 0.2, {}, cooldown_s=60)


@pytest.mark.parametrize("nesterov,fragments", [(True, 1), (False, 1), (True, 2), (False, 2)])
def test_a_federation_equals_all_to_all_diloco_on_the_same_schedule(tmp_path, nesterov, fragments):
    """One outer step and one inner loop for every topology: a 2-client federation and
    in-process DiLoCo with the same H, steps and seed end with the same θ_g and outer
    momentum, bit for bit, with Nesterov's outer momentum and with plain momentum; and so
    do Streaming DiLoCo with P = 2, τ = 0 and the federation whose rounds are its syncs
    (one fragment each: after steps 4, 6, 8, 10; both at the end, 12). (fp32 on the wire:
    the server re-encodes the mean it sends back, which all-to-all all-gather does not.)"""
    from farsync.algorithms.fragments import flatten
    from farsync.train import checkpoint as ckpt
    from farsync.train import train

    cfg = _cfg("--algo.workers=2", "--algo.codec=fp32", f"--algo.outer_nesterov={nesterov}", "--train.steps=12",
               f"--train.run_dir={tmp_path}", "--train.name=a2a", "--train.progress=false", "--train.eval_every=100",
               "--train.eval_batches=1", "--train.checkpoint_every=0", *(STREAMING if fragments == 2 else []))
    server = simulate_federation(cfg, str(tmp_path / "fed"), rounds=3, log=lambda m: None)
    want = [[0], [1], [0], [1], [0, 1]] if fragments == 2 else [[0]] * 3
    assert [row["fragments"] for row in server.history] == want
    train(cfg)
    state = ckpt.load_worker(str(tmp_path / "a2a"), 12, 0)
    anchors, opts = state["algo"]["anchors"], state["algo"]["outer_optimizers"]
    assert len(anchors) == fragments
    for f in range(fragments):
        assert torch.equal(server.model.part(f), flatten(anchors[f]))
        ours = server.model.outer[f].optimizer.state_dict()["state"][0]["momentum_buffer"]
        assert torch.equal(ours, flatten([opts[f]["state"][i]["momentum_buffer"] for i in range(len(anchors[f]))]))
    if fragments == 2:  # a round's upload is one fragment's Δ: about half the model's
        up = [row["bytes_up"][0] for row in server.history]
        assert up[:4] == [server.codecs[f].nbytes() for f in (0, 1, 0, 1)]
        assert max(up[:4]) < 0.75 * server.model.numel * 4


def test_the_deadline_is_a_multiple_of_the_recent_rounds_median_within_the_floor_and_the_timeout():
    from farsync.federated.rounds import round_deadline

    kw = dict(timeout_s=600.0, factor=3.0, floor_s=10.0, window=3)
    assert round_deadline([], **kw) == 600.0  # no history (the clients' start-up): the timeout
    assert round_deadline([8.0, 5.0, 6.0], **kw) == 18.0  # 3 x the median
    assert round_deadline([100.0, 5.0, 6.0, 7.0], **kw) == 18.0  # the last 3 rounds only
    assert round_deadline([4.0, 6.0], **kw) == 15.0  # an even count: the middle two's mean
    assert round_deadline([1.0, 2.0], **kw) == 10.0  # never below the floor
    assert round_deadline([50.0, 400.0, 300.0], **kw) == 600.0  # never above the timeout
    assert round_deadline([5.0], **{**kw, "factor": 0.0}) == 600.0  # adaptive deadlines off


class LocalGrid:
    """Flower's Grid in one process, for run_server: nodes 10, 11, ... are clients 0, 1, ...;
    a message's ClientApp runs as it is pushed, through the real messages; ``lost`` holds
    the (round, node) pairs whose reply never comes."""

    def __init__(self, cfg, state_dir: str, lost=()):
        from farsync.data import Corpus

        self.cfg, self.state_dir, self.lost = cfg, state_dir, set(lost)
        self.corpus = Corpus.build(cfg.data, log=lambda m: None)
        self.replies, self.sent = {}, 0

    def get_node_ids(self):
        return [10 + c for c in range(self.cfg.algo.workers)]

    def push_messages(self, messages):
        from types import SimpleNamespace

        from farsync.federated.messages import record_to_task, reply_to_record

        ids = []
        for m in messages:
            self.sent += 1
            i = f"m{self.sent}"
            if (int(m.group), m.node) not in self.lost:
                rep = Client(self.cfg, m.node - 10, self.state_dir, self.corpus).train(record_to_task(m.content))
                self.replies[i] = SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i),
                                                  has_error=lambda: False, content=reply_to_record(rep, 0.0))
            ids.append(i)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in ids if i in self.replies]

    @staticmethod
    def message(content, node, group, ttl):
        from types import SimpleNamespace

        return SimpleNamespace(content=content, node=node, group=group, ttl=ttl)


def _serve(cfg, tmp_path, lost=()):
    """run_server over a LocalGrid; its rows."""
    import json

    from farsync.federated.rounds import run_server

    grid = LocalGrid(cfg, str(tmp_path / "clients"), lost)
    run_server(grid, cfg, str(tmp_path / "run"), new_message=LocalGrid.message)
    return [json.loads(x) for x in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]


def test_a_lost_reply_ends_its_round_at_the_adaptive_deadline_and_the_client_is_logged(tmp_path, capsys):
    """run_server over a Grid in one process: client 2's reply in round 1 never comes. That
    round ends at the deadline the rule gives from round 0 (not round_timeout_s), without
    client 2, which is logged as failed; with no cooldown it is back in round 2, sent θ_g in
    full."""
    pytest.importorskip("flwr")
    from farsync.federated.rounds import round_deadline

    cfg = _cfg("--algo.workers=3", "--train.steps=12", "--federated.min_clients=3", "--federated.round_timeout_s=600",
               "--federated.deadline_floor_s=0.2", "--federated.cooldown_s=0", "--train.eval_every=100",
               "--train.eval_batches=1")
    rows = _serve(cfg, tmp_path, lost=[(1, 12)])  # node 12 is client 2
    fed = cfg.federated
    rule = dict(timeout_s=fed.round_timeout_s, factor=fed.deadline_factor, floor_s=fed.deadline_floor_s,
                window=fed.deadline_window)
    assert rows[0]["deadline_seconds"] == 600.0 and rows[0]["kept"] == [0, 1, 2]
    assert rows[1]["deadline_seconds"] == round_deadline([rows[0]["last_reply_seconds"]], **rule) < 600.0
    assert rows[1]["kept"] == [0, 1] and list(rows[1]["failed"]) == ["12"]
    assert rows[1]["failed"]["12"].startswith("no reply by the round's deadline")
    assert rows[2]["deadline_seconds"] == round_deadline([r["last_reply_seconds"] for r in rows[:2]], **rule)
    assert rows[2]["kept"] == [0, 1, 2] and rows[2]["bytes_down"]["2"] > rows[2]["bytes_down"]["0"]
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "round 2/3" in x)
    assert "2 of 3 replied" in line and "failed [12]" in line


def test_the_round_loop_with_two_fragments_over_messages_equals_the_simulation(tmp_path):
    """Streaming fragments through run_server and the real messages (Task and Reply as
    Flower records: per-fragment means, momenta and payloads, θ_g in full for a client that
    missed a round): the same θ_g as the in-process federation, bit for bit, and each
    round's downlink one fragment's mean for a client that was there the round before."""
    pytest.importorskip("flwr")
    from farsync.federated.core import check_federated

    cfg = _cfg("--algo.workers=2", "--train.steps=12", "--federated.min_clients=2", *STREAMING,
               "--train.eval_every=100", "--train.eval_batches=1")
    rows = _serve(cfg, tmp_path)
    sim = simulate_federation(cfg, str(tmp_path / "sim"), rounds=3, log=lambda m: None)
    assert torch.equal(torch.load(tmp_path / "run" / "theta.pt"), sim.model.theta)
    assert [r["fragments"] for r in rows] == [[0], [1], [0], [1], [0, 1]] and all(r["kept"] == [0, 1] for r in rows)
    for r in rows[1:]:  # the previous round's fragment mean, fp4: a fraction of the model's fp32 bytes
        prev = rows[r["round"] - 1]["fragments"]
        assert r["bytes_down"]["0"] == sum(sim.codecs[f].nbytes() for f in prev)
    with pytest.raises(ConfigError, match=r"algo.sync_delay \(τ\) = 1: federated rounds have no overlap"):
        check_federated(_cfg("--algo.mode=streaming", "--algo.fragments=2", "--algo.sync_delay=1"))
    with pytest.raises(ConfigError, match=r"algo.mixing \(α\) = 0.5: .*set --algo.mixing=0"):
        check_federated(_cfg(*STREAMING, "--algo.mixing=0.5"))


def test_federate_defaults_to_no_overlap_and_refuses_one_asked_for():
    from farsync.federated.core import federated_config

    assert build_config(None, []).algo.sync_delay == 1  # farsync train's default
    cfg = federated_config(None, ["--algo.fragments=2"])
    assert cfg.algo.mode == "streaming" and cfg.algo.sync_delay == 0 and cfg.algo.fragments == 2
    with pytest.raises(ConfigError, match="algo.sync_delay"):
        federated_config(None, ["--algo.sync_delay=1"])
    with pytest.raises(ConfigError, match="algo.sync_delay"):
        federated_config({"algo": {"sync_delay": 1}}, [])
