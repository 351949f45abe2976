"""farsync's federated mode on Flower's deployment runtime: a ServerApp that drives the
rounds itself (:mod:`farsync.federated.rounds`; no Flower strategy: the outer step is
farsync's) and a ClientApp that trains. Both are thin: the arithmetic is
:mod:`farsync.federated.core`, the messages :mod:`farsync.federated.messages`.
"""

from __future__ import annotations

import os
import time

import torch

from farsync.federated.messages import config_from_context, record_to_task, reply_to_record

_T_IMPORT = time.time()  # a ClientApp is a new process for every message: when it started


# --- ClientApp ---------------------------------------------------------------------------

def client_train(msg, context):
    """One round on this client (a new process each time: state from the state folder)."""
    from flwr.app import Message

    from farsync.data import Corpus
    from farsync.federated.core import Client, parse_client_fault

    cfg = config_from_context(context)
    torch.set_num_threads(cfg.train.threads or torch.get_num_threads())
    node = context.node_config
    if "client" not in node:
        raise ValueError("this SuperNode has no client index: start it with --node-config 'client=K'")
    index = int(node["client"])
    base = str(node.get("state-dir", os.path.join(os.path.expanduser("~"), ".farsync", "clients")))
    state_dir = os.path.join(base, f"run-{context.run_id}")
    corpus = Corpus.build(cfg.data, log=lambda m: None)
    fault = str(node.get("fault", ""))
    if fault:
        parse_client_fault(fault)  # a bad one is this message's error
    work = record_to_task(msg.content)
    speed = float(node.get("speed", 1.0))
    if not 0 < speed <= 1:
        raise ValueError(f"node config speed must be in (0, 1] (got {speed})")
    reply = Client(cfg, index, state_dir, corpus).train(work, fault=fault, speed=speed)
    return Message(reply_to_record(reply, _T_IMPORT), reply_to=msg)


def make_client_app():
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.train()(client_train)
    return app


# --- ServerApp ---------------------------------------------------------------------------

def server_main(grid, context):
    from farsync.federated.rounds import run_server

    run_server(grid, config_from_context(context), str(context.run_config["run-dir"]))


def make_server_app():
    from flwr.serverapp import ServerApp

    app = ServerApp()
    app.main()(server_main)
    return app
