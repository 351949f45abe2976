"""The messages of farsync's federated rounds, as Flower ``RecordDict``s: tensors travel as
raw bytes (``Array``s of uint8), everything else as config and metric records (plain data).

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
import time

import torch

from farsync.federated.core import from_bytes, to_bytes


def _raw(b: bytes):
    from flwr.app import Array

    return Array("uint8", (len(b),), "raw", b)


def task_to_record(work):
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


def record_to_task(rd):
    from farsync.federated.core import Task

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
    return Task(int(c["round"]), int(c["steps"]), int(c["total_rounds"]), deltas=deltas, full=full)


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
