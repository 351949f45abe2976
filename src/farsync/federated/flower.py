"""farsync's federated mode on Flower's deployment runtime: a ServerApp that drives the
rounds itself (no Flower strategy: the outer step is farsync's) and a ClientApp that
trains. Both are thin: the arithmetic is :mod:`farsync.federated.core`.

Messages (Flower ``RecordDict``):
  server → client (``train``): config ``work`` {round, steps, total_rounds, deltas: the
      rounds whose means follow, skipped: those with no mean, full: bool}; arrays
      ``downlink`` {"delta-<r>": the encoded mean of round r (raw uint8), and with full:
      "theta" (fp32 bytes), "momentum" (fp32 bytes, when the outer optimizer has one),
      config "version"}.
  client → server: arrays ``update`` {"delta": Δ encoded by the codec, raw uint8};
      metrics ``info`` {client, round, tokens, train_loss, seconds of catch-up / training /
      encode+save / process start to reply}.

The farsync config travels as TOML text in the run config (``farsync-config``); each
client's index (its data shard) and state folder come from its SuperNode's
``--node-config 'client=K state-dir="DIR"'``.
"""

from __future__ import annotations

import json
import os
import time

import torch

from farsync.federated.core import from_bytes, to_bytes

_T_IMPORT = time.time()  # a ClientApp is a new process for every message: when it started


def _raw(b: bytes):
    from flwr.app import Array

    return Array("uint8", (len(b),), "raw", b)


def work_to_record(work):
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    arrays = {f"delta-{r}": _raw(b) for r, b in work.deltas if b is not None}
    cfg = {"round": work.round, "steps": work.steps, "total_rounds": work.total_rounds,
           "deltas": [r for r, _ in work.deltas], "skipped": [r for r, b in work.deltas if b is None],
           "full": work.full is not None, "version": -1}
    if work.full is not None:
        arrays["theta"] = _raw(to_bytes(work.full["theta"].float()))
        state = work.full["opt"]["state"]
        if state and "momentum_buffer" in state[0] and state[0]["momentum_buffer"] is not None:
            arrays["momentum"] = _raw(to_bytes(state[0]["momentum_buffer"].float()))
        cfg["version"] = work.full["version"]
        cfg["opt_groups"] = json.dumps(work.full["opt"]["param_groups"])
    return RecordDict({"work": ConfigRecord(cfg), "downlink": ArrayRecord(arrays)})


def record_to_work(rd):
    from farsync.federated.core import Work

    c = rd.config_records["work"]
    arrays = rd.array_records["downlink"]
    skipped = set(c["skipped"] or [])
    deltas = [(r, None if r in skipped else bytes(arrays[f"delta-{r}"].data)) for r in (c["deltas"] or [])]
    full = None
    if c["full"]:
        theta = from_bytes(arrays["theta"].data, torch.float32)
        state = {}
        if "momentum" in arrays:
            state = {0: {"momentum_buffer": from_bytes(arrays["momentum"].data, torch.float32)}}
        full = {"theta": theta, "version": int(c["version"]),
                "opt": {"state": state, "param_groups": json.loads(c["opt_groups"])}}
    return Work(int(c["round"]), int(c["steps"]), int(c["total_rounds"]), deltas=deltas, full=full)


def reply_to_record(reply, started: float):
    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    info = {"client": reply.client, "round": reply.round, "tokens": reply.tokens, "train_loss": reply.train_loss,
            **{f"seconds_{k}": float(v) for k, v in reply.seconds.items()},
            "seconds_process": time.time() - started}
    return RecordDict({"update": ArrayRecord({"delta": _raw(reply.payload)}), "info": MetricRecord(info)})


def record_to_reply(rd):
    from farsync.federated.core import Reply

    info = rd.metric_records["info"]
    seconds = {k[len("seconds_"):]: float(v) for k, v in info.items() if k.startswith("seconds_")}
    return Reply(int(info["client"]), int(info["round"]), bytes(rd.array_records["update"]["delta"].data),
                 int(info["tokens"]), float(info["train_loss"]), seconds)


def config_from_context(context):
    from farsync.train.config import build_config

    import tomllib

    return build_config(tomllib.loads(str(context.run_config["farsync-config"])))


# --- ClientApp ---------------------------------------------------------------------------

def client_train(msg, context):
    """One round on this client (a new process each time: state from the state folder)."""
    from flwr.app import Message

    from farsync.data import Corpus
    from farsync.federated.core import Client, parse_fault

    cfg = config_from_context(context)
    torch.set_num_threads(cfg.train.threads or torch.get_num_threads())
    node = context.node_config
    if "client" not in node:
        raise ValueError("this SuperNode has no client index: start it with --node-config 'client=K'")
    index = int(node["client"])
    base = str(node.get("state-dir", os.path.join(os.path.expanduser("~"), ".farsync", "clients")))
    state_dir = os.path.join(base, f"run-{context.run_id}")
    corpus = Corpus.build(cfg.data, log=lambda m: None)
    fault = parse_fault(str(node["fault"])) if node.get("fault") else None
    work = record_to_work(msg.content)
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
