"""farsync's federated mode on Flower's deployment runtime: a ServerApp that drives the
rounds itself (:mod:`farsync.federated.rounds`; no Flower strategy: the outer step is
farsync's) and a ClientApp that relays each message to the site's trainer. Both are thin:
the arithmetic is :mod:`farsync.federated.core`, the messages
:mod:`farsync.federated.messages`, the training :mod:`farsync.federated.trainer`.

No torch at import, nor in the ClientApp's path: Flower starts a new ClientApp process for
every message, and the relay only carries the message over the local channel
(:mod:`farsync.federated.channel`) to the long-lived trainer and its answer back.
"""

from __future__ import annotations

import os
import time

from farsync.federated import channel

_T_IMPORT = time.time()  # a ClientApp is a new process for every message: when it started


# --- ClientApp: the relay ----------------------------------------------------------------

def seconds_left(created_at: float, ttl: float, now: float) -> float:
    """How long a relay may wait for its trainer: until the message's deadline
    (``created_at`` + ``ttl``, the round's deadline), or ``ttl`` from now when the two
    sites' clocks disagree so much that this is not in (0, ttl]."""
    # created_at is the server's clock, now this site's: a message whose deadline has passed
    # (left <= 0) cannot be told apart from one sent by a server whose clock runs behind, so
    # it too gets a full TTL (the server may have stopped waiting for its reply by then).
    left = created_at + ttl - now
    return left if 0 < left <= ttl else ttl


def relay(content, node_config, run_config, run_id: int, timeout_s: float):
    """Hand one message's content (a RecordDict) to this site's trainer; its answer (the
    reply's RecordDict). The site (client index, state folder, test faults) is the
    SuperNode's ``--node-config``; no trainer, a refused key, an error of the trainer or no
    answer within ``timeout_s``: an exception of one line."""
    if "client" not in node_config:
        raise ValueError("this SuperNode has no client index: start it with --node-config 'client=K'")
    client = int(node_config["client"])
    base = str(node_config.get("state-dir", os.path.join(os.path.expanduser("~"), ".farsync", "clients")))
    header = {"kind": "train", "run": int(run_id), "client": client, "config": str(run_config["farsync-config"]),
              "fault": str(node_config.get("fault", "")), "speed": float(node_config.get("speed", 1.0)),
              "started": _T_IMPORT}
    return channel.request(base, client, header, content, timeout_s)[1]


def client_train(msg, context):
    """One round on this client: the message to the site's trainer and its reply back."""
    from flwr.app import Message

    left = seconds_left(msg.metadata.created_at, msg.metadata.ttl, time.time())
    out = relay(msg.content, context.node_config, context.run_config, context.run_id, left)
    return Message(out, reply_to=msg)


def make_client_app():
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.train()(client_train)
    return app


# --- ServerApp ---------------------------------------------------------------------------

def server_main(grid, context):
    """The run, every round; an error that stops it is also left in RUN/failed.json (one
    line), so whoever follows the run there stops at once instead of waiting for a summary."""
    import json
    import os

    from farsync.federated.launch import FAILED
    from farsync.federated.messages import config_from_context
    from farsync.federated.rounds import run_server
    from farsync.files import atomic_write

    run_dir = str(context.run_config["run-dir"])
    try:
        run_server(grid, config_from_context(context), run_dir)
    except Exception as e:
        error = f"{type(e).__name__}: {e}".splitlines()[0]
        atomic_write(os.path.join(run_dir, FAILED), lambda f: f.write(json.dumps({"error": error}).encode()))
        raise


def make_server_app():
    from flwr.serverapp import ServerApp

    app = ServerApp()
    app.main()(server_main)
    return app
