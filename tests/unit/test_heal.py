"""Elastic heals and syncs trust nothing a peer sends (issue 24): the state a joining
worker receives is tensors and JSON (never unpickled), and with a secret every heal and
every sync's members prove it. Over real torchft gloo groups of 2-3 ranks in threads."""

from __future__ import annotations

import os
import pickle
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import torch

from farsync.comm import heal
from farsync.comm.distributed import Transport

torchft = pytest.importorskip("torchft")

KEY, OTHER = b"k" * 32, b"o" * 32
TIMEOUT = timedelta(seconds=10)


class Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def in_threads(n, fn):
    """fn(rank, pg) on ``n`` ranks of a fresh torchft gloo group, each in a thread; the
    results (an exception is returned, not raised)."""
    from torch.distributed import TCPStore

    store = TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
    prefix = uuid.uuid4().hex

    def run(rank):
        pg = torchft.ProcessGroupGloo(timeout=timedelta(seconds=5))
        pg.configure(f"localhost:{store.port}/{prefix}", "0", rank, n)
        try:
            return fn(rank, pg)
        except Exception as e:  # noqa: BLE001 - the test looks at it
            return e
        finally:
            pg.shutdown() if hasattr(pg, "shutdown") else None

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def shared_state():
    """The shape of DiLoCo.shared_state() plus an exchange record: int keys, tuples, bf16."""
    return {"user": {"default": {
        "farsync": {"mode": "streaming", "step": 40, "fragment_names": [["a.w", "a.b"], ["b.w"]],
                    "anchors": [[torch.randn(3, 4), torch.randn(4)], [torch.randn(2, 2).bfloat16()]],
                    "outer_optimizers": [{"state": {0: {"momentum_buffer": torch.randn(3, 4)}, 1: {}},
                                          "param_groups": [{"lr": 0.7, "momentum": 0.8, "nesterov": True,
                                                            "params": [0, 1], "foreach": None}]}],
                    "exclusions": [{"worker": 1, "round": 3, "why": "norm 1e9", "norm": float("inf")}],
                    "skipped_rounds": [], "flags": torch.tensor([True, False]), "none": torch.empty(0)},
        "exchange": {"round": ("fragment", 1, 40), "numel": 8, "method": "all-gather",
                     "codec": {"name": "fp4-e3m0", "block_size": None, "stochastic_rounding": False}}}},
        "torchft": {"step": 7, "batches_committed": 21}}


def same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


def test_it_is_torchfts_checkpoint_transport():
    from torchft.checkpointing.transport import CheckpointTransport

    methods = {m for m in dir(CheckpointTransport) if not m.startswith("_")}  # torchft calls them all
    assert methods and methods <= {m for m in dir(heal.SafeTransport) if callable(getattr(heal.SafeTransport, m))}


def test_the_state_travels_as_json_and_tensor_bytes_exactly():
    state = shared_state()
    meta, tensors = heal.encode(state)
    assert b"pickle" not in meta and all(t.dtype == torch.uint8 for t in tensors)
    import json

    assert same(heal.decode(json.loads(meta), [t.clone() for t in tensors]), state)
    with pytest.raises(TypeError, match="cannot carry a Evil"):
        heal.encode({"x": Evil("/nonexistent")})


@pytest.mark.parametrize("secret", [None, KEY])
def test_a_heal_over_gloo_delivers_the_state(secret):
    state = shared_state()

    def side(rank, pg):
        t = heal.SafeTransport(pg, TIMEOUT, worker=rank, secret=secret)
        if rank == 0:
            return t.send_checkpoint([1], 5, state, TIMEOUT)
        return t.recv_checkpoint(0, "farsync-heal-v1 worker=0", 5, TIMEOUT)

    sent, got = in_threads(2, side)
    assert sent is None and same(got, state)


def _forged(pg, meta: bytes, *, status=heal.OK):
    """A peer that speaks the heal's framing but sends ``meta`` (a pickle) with no proof."""
    req = torch.zeros(heal._REQ.size, dtype=torch.uint8)
    pg.recv([req], 1, heal.TAG_REQ).wait(TIMEOUT)
    head = heal._HEAD.pack(heal.MAGIC, status, 0, 5, 0, len(meta), 0, 0) + bytes(32)
    pg.send([torch.frombuffer(bytearray(head), dtype=torch.uint8)], 1, heal.TAG_HEAD).wait(TIMEOUT)
    short = timedelta(seconds=1)  # a refusing receiver takes no more
    pg.send([torch.frombuffer(bytearray(meta), dtype=torch.uint8)], 1, heal.TAG_META).wait(short)
    pg.send([torch.zeros(32, dtype=torch.uint8)], 1, heal.TAG_MAC1).wait(short)
    pg.send([torch.zeros(32, dtype=torch.uint8)], 1, heal.TAG_MAC2).wait(short)


@pytest.mark.parametrize("sender", ["pgtransport", "forged", "forged-with-secret"])
def test_a_malicious_heal_payload_is_refused_naming_the_peer_and_nothing_runs(tmp_path, sender):
    marker = tmp_path / "ran"
    evil = {"user": {"default": {"farsync": Evil(marker)}}, "torchft": {"step": 5, "batches_committed": 0}}

    def side(rank, pg):
        if rank == 0:
            if sender == "pgtransport":  # what torchft's own transport sends: a pickled metadata
                from torchft.checkpointing.pg_transport import PGTransport

                return PGTransport(pg, timeout=timedelta(seconds=1), device=torch.device("cpu")).send_checkpoint(
                    [1], 5, evil, timedelta(seconds=1))
            return _forged(pg, pickle.dumps(evil))
        t = heal.SafeTransport(pg, TIMEOUT, worker=1, secret=KEY if sender == "forged-with-secret" else None)
        try:
            return t.recv_checkpoint(0, "farsync-heal-v1 worker=0", 5, TIMEOUT)
        finally:
            assert t.refused is not None

    _, got = in_threads(2, side)
    assert isinstance(got, heal.AuthError) and got.fatal, got
    msg = str(got)
    assert "worker 0 (quorum rank 0)" in msg and "refused" in msg and len(msg.splitlines()) == 1, msg
    assert not marker.exists()


@pytest.mark.parametrize("live,joining,who", [(KEY, None, "refused"), (KEY, OTHER, "refused"), (None, KEY, "no-secret")])
def test_a_heal_between_workers_without_the_same_secret_is_refused(live, joining, who):
    def side(rank, pg):
        t = heal.SafeTransport(pg, TIMEOUT, worker=rank, secret=live if rank == 0 else joining)
        if rank == 0:
            return t.send_checkpoint([1], 5, shared_state(), TIMEOUT)
        return t.recv_checkpoint(0, "farsync-heal-v1 worker=0", 5, TIMEOUT)

    sender, receiver = in_threads(2, side)
    assert isinstance(receiver, heal.AuthError) and receiver.fatal  # the joining worker stops
    assert isinstance(sender, heal.AuthError) and not sender.fatal  # the live one goes on without it
    if who == "refused":  # with another secret, the refusal's own proof fails the joining worker's check
        assert ("worker 0 (quorum rank 0) refused this worker" if joining is None else
                "the state worker 0 (quorum rank 0) offered fails the elastic secret's check") in str(receiver)
        assert str(sender).startswith("refused worker 1 (quorum rank 1) asked for the run's state")
    else:
        assert "worker 0 (quorum rank 0) runs without an elastic secret" in str(receiver)


def _members(secrets):
    def side(rank, pg):
        def post(sends, recvs):
            works = [pg.recv([t], j, 0) for j, t in enumerate(recvs) if t is not None]
            return works + [pg.send([t], j, 0) for j, t in enumerate(sends) if t is not None]

        return heal.prove_members(Transport(rank, len(secrets), post), 10 + rank, ("fragment", 0, 20), 3, secrets[rank])

    return in_threads(len(secrets), side)


def test_every_member_of_a_sync_proves_the_secret():
    assert _members([KEY, KEY, KEY]) == [[10, 11, 12]] * 3
    assert _members([None, None]) == [[10, 11]] * 2  # no secret: nothing to prove
    a, b, c = _members([KEY, KEY, None])  # a worker without the secret is refused
    assert isinstance(c, heal.AuthError) and c.fatal and "this worker has none" in str(c)
    for e in (a, b):
        assert isinstance(e, heal.AuthError) and not e.fatal and str(e).startswith("refused worker 12 in sync")
    a, b, c = _members([KEY, KEY, OTHER])  # one with another secret: it matches nobody, it stops
    assert isinstance(c, heal.AuthError) and c.fatal and "matches none of the other workers' ([10, 11])" in str(c)
    assert all(isinstance(e, heal.AuthError) and not e.fatal and "refused worker 12" in str(e) for e in (a, b))
    a, b = _members([KEY, OTHER])
    assert all(isinstance(e, heal.AuthError) and e.fatal for e in (a, b))


def test_the_secret_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(heal.SECRET_ENV, raising=False)
    assert heal.load_secret("") is None
    (tmp_path / "s").write_bytes(b"x" * 20 + b"\n")
    assert heal.load_secret(str(tmp_path / "s")) == b"x" * 20
    monkeypatch.setenv(heal.SECRET_ENV, "short")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        heal.load_secret("")
    monkeypatch.setenv(heal.SECRET_ENV, "y" * 16)
    assert heal.load_secret("") == b"y" * 16
    from farsync.train.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="elastic.secret_file: no such file: '/no/such'"):
        build_config(None, ["elastic.secret_file=/no/such"])
