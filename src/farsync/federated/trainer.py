"""A site's trainer: one long-lived process per client site (started by `farsync federate
client`, or alone by `farsync federate trainer`) that holds the model, the inner optimizer,
the data position and the copy of θ_g in memory between rounds. The ClientApp Flower starts
for every message is a relay (:func:`farsync.federated.flower.client_train`, no torch) that
hands the message over the local channel (:mod:`farsync.federated.channel`) and returns
the answer.

The training is :class:`farsync.federated.core.Client`'s, unchanged: it saves its state
atomically after every round before it replies, so a crash of the trainer or of a relay
loses nothing a reply promised; a trainer started again loads that state
(:class:`~farsync.federated.core.Client` reads it when it is built). It keeps the
:class:`~farsync.federated.core.Client` of the run it last trained in (a message of
another run builds that run's from its state folder), and drops it when a message fails,
so the next one starts from the saved state.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from multiprocessing import AuthenticationError

import torch

from farsync.federated import channel

#: seconds a relay has to send its message once it is connected (it sends it at once)
REQUEST_S = 60.0


def _log(msg: str) -> None:
    print(f"farsync trainer: {msg}", file=sys.stderr, flush=True)


@dataclass
class _Run:
    run: int
    config: str  # the farsync config as the run ships it (TOML)
    client: object  # farsync.federated.core.Client


class SiteTrainer:
    """Client ``client``'s trainer over ``state_dir`` (the SuperNode's ``state-dir``): a
    run's state in ``state_dir``/run-ID (as every ClientApp kept it), the channel's socket
    and key beside them. :meth:`serve` answers relays until :meth:`stop`."""

    def __init__(self, state_dir: str, client: int, device: torch.device | None = None):
        self.state_dir, self.client = os.path.abspath(state_dir), client
        self.device = device or torch.device("cpu")
        self.threads = torch.get_num_threads()  # a run's train.threads = 0: as many as at the start
        self.current: _Run | None = None
        self.built = 0  # Client objects built (each reads its state from disk)
        self.listener = channel.listen(self.state_dir, client)
        self._stopping = False

    def client_for(self, run: int, config_text: str):
        """The run's :class:`~farsync.federated.core.Client`: the one in memory, or one
        built from the run's state folder."""
        cur = self.current
        if cur is None or cur.run != run or cur.config != config_text:
            from farsync.data import Corpus
            from farsync.federated.core import Client, check_federated
            from farsync.federated.messages import config_from_toml

            self.current = None  # the previous run's Client goes (its state is on disk)
            cfg = check_federated(config_from_toml(config_text))
            torch.set_num_threads(cfg.train.threads or self.threads)
            corpus = Corpus.build(cfg.data, log=lambda m: None)
            client = Client(cfg, self.client, os.path.join(self.state_dir, f"run-{run}"), corpus, self.device)
            self.built += 1
            self.current = cur = _Run(run, config_text, client)
        return cur.client

    def handle(self, header: dict, content):
        """One relay's message: (answer header, answer RecordDict or None)."""
        if header.get("kind") == "ping":
            return {"client": self.client, "pid": os.getpid()}, None
        from farsync.federated.core import parse_client_fault
        from farsync.federated.messages import record_to_task, reply_to_record

        if int(header["client"]) != self.client:
            raise ValueError(f"this trainer trains client {self.client}; the message is for client {header['client']} "
                             "(the SuperNode's --node-config client=K and the trainer's --client must agree)")
        fault, speed = str(header.get("fault", "")), float(header.get("speed", 1.0))
        if fault:
            parse_client_fault(fault)  # a bad one is this message's error
        if not 0 < speed <= 1:
            raise ValueError(f"node config speed must be in (0, 1] (got {speed})")
        client = self.client_for(int(header["run"]), str(header["config"]))
        reply = client.train(record_to_task(content), fault=fault, speed=speed)
        return {}, reply_to_record(reply, float(header["started"]))

    def serve_one(self) -> None:
        """Accept one relay and answer it; a relay that fails the handshake, goes away or
        sends nothing is logged and dropped."""
        try:
            conn = self.listener.accept()
        except (AuthenticationError, EOFError, OSError) as e:  # OSError: a timeout, a reset
            _log(f"refused a connection: {type(e).__name__}: {e}")
            return
        with conn:
            if self._stopping:
                return
            try:
                header, content = channel.receive(conn, time.time() + REQUEST_S, "a relay's message")
            except Exception as e:  # gone, silent, or not farsync's frames: that relay only
                _log(f"dropped a relay: {type(e).__name__}: {e}")
                return
            try:
                answer, out = self.handle(header, content)
            except Exception as e:  # the message's error, in one line; the next message starts from disk
                self.current = None
                answer, out = {"error": f"client {self.client}: {type(e).__name__}: {e}".replace("\n", " ")}, None
                _log(answer["error"])
            try:
                channel.bound(conn, REQUEST_S)  # a relay that stops reading cannot hold the site
                channel.send(conn, answer, out)
            except OSError as e:  # gone (a broken pipe, a reset) or frozen (BlockingIOError)
                _log(f"the relay went away before the answer ({type(e).__name__}: {e}); the round's state is saved")

    def serve(self) -> None:
        """Answer relays, one at a time, until :meth:`stop`."""
        _log(f"client {self.client} listening on {channel.socket_path(self.state_dir, self.client)}")
        try:
            while not self._stopping:
                self.serve_one()
        finally:
            self.close()

    def stop(self) -> None:
        """End :meth:`serve` (from another thread): it is woken by a last connection."""
        self._stopping = True
        try:
            channel.ping(self.state_dir, self.client, REQUEST_S)
        except (channel.NoTrainer, OSError, EOFError, RuntimeError):
            pass

    def close(self) -> None:
        try:
            self.listener.close()  # unlinks the socket
        except OSError:
            pass

