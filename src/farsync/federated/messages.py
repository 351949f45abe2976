"""The messages of farsync's federated rounds, as Flower ``RecordDict``s: tensors travel as
raw bytes (``Array``s of uint8), everything else as config and metric records (plain data).

  server → client (``train``): config ``work`` {round, start, steps, fragments: those the
      reply carries, total_rounds, deltas and delta_fragments: the (round, fragment) of
      each mean that follows, skipped: the positions among them with no mean, full: bool};
      arrays ``downlink`` {"delta-<r>-<p>": the encoded mean of fragment p in round r
      (raw uint8), and with full: "theta" (fp32 bytes, all fragments), "momentum-<p>" (fp32
      bytes, when fragment p's outer optimizer has one), config "version", "opt_groups"}.
  client → server: arrays ``update`` {"delta-<j>": Δ of the round's j-th fragment encoded
      by the codec, raw uint8}; metrics ``info`` {client, round, payloads, tokens (per
      fragment), trained, train_loss, seconds of catch-up / training / encode+save /
      relay process start to reply}.

The farsync config travels as TOML text in the run config (``farsync-config``); each
client's index (its data shard) and state folder come from its SuperNode's
``--node-config 'client=K state-dir="DIR"'``. Between a site's relay and its trainer
(:mod:`farsync.federated.channel`) the same ``RecordDict``s travel as Flower carries them.
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

    arrays = {f"delta-{r}-{f}": _raw(b) for r, f, b in work.deltas if b is not None}
    cfg = {"round": work.round, "start": work.start, "steps": work.steps, "fragments": list(work.fragments),
           "total_rounds": work.total_rounds, "deltas": [r for r, _, _ in work.deltas],
           "delta_fragments": [f for _, f, _ in work.deltas],
           "skipped": [i for i, (_, _, b) in enumerate(work.deltas) if b is None],
           "full": work.full is not None, "version": -1}
    if work.full is not None:
        arrays["theta"] = _raw(to_bytes(work.full["theta"].float()))
        for f, opt in enumerate(work.full["opt"]):
            state = opt["state"]
            if state and "momentum_buffer" in state[0] and state[0]["momentum_buffer"] is not None:
                arrays[f"momentum-{f}"] = _raw(to_bytes(state[0]["momentum_buffer"].float()))
        cfg["version"] = work.full["version"]
        cfg["opt_groups"] = json.dumps([opt["param_groups"] for opt in work.full["opt"]])
    return RecordDict({"work": ConfigRecord(cfg), "downlink": ArrayRecord(arrays)})


def record_to_task(rd):
    from farsync.federated.core import Task

    c = rd.config_records["work"]
    arrays = rd.array_records["downlink"]
    skipped = set(c["skipped"] or [])
    deltas = [(r, f, None if i in skipped else bytes(arrays[f"delta-{r}-{f}"].data))
              for i, (r, f) in enumerate(zip(c["deltas"] or [], c["delta_fragments"] or []))]
    full = None
    if c["full"]:
        theta = from_bytes(arrays["theta"].data, torch.float32)
        opts = []
        for f, groups in enumerate(json.loads(c["opt_groups"])):
            state = {}
            if f"momentum-{f}" in arrays:
                state = {0: {"momentum_buffer": from_bytes(arrays[f"momentum-{f}"].data, torch.float32)}}
            opts.append({"state": state, "param_groups": groups})
        full = {"theta": theta, "version": int(c["version"]), "opt": opts}
    return Task(int(c["round"]), int(c["start"]), int(c["steps"]), tuple(int(f) for f in c["fragments"]),
                int(c["total_rounds"]), deltas=deltas, full=full)


def reply_to_record(reply, started: float):
    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    info = {"client": reply.client, "round": reply.round, "payloads": len(reply.payloads),
            "tokens": [int(t) for t in reply.tokens], "trained": reply.trained, "train_loss": reply.train_loss,
            **{f"seconds_{k}": float(v) for k, v in reply.seconds.items()},
            "seconds_process": time.time() - started}
    arrays = {f"delta-{j}": _raw(b) for j, b in enumerate(reply.payloads)}
    return RecordDict({"update": ArrayRecord(arrays), "info": MetricRecord(info)})


def record_to_reply(rd):
    from farsync.federated.core import Reply

    info = rd.metric_records["info"]
    seconds = {k[len("seconds_"):]: float(v) for k, v in info.items() if k.startswith("seconds_")}
    update = rd.array_records["update"]
    payloads = [bytes(update[f"delta-{j}"].data) for j in range(int(info["payloads"]))]
    return Reply(int(info["client"]), int(info["round"]), payloads, [int(t) for t in info["tokens"]],
                 int(info["trained"]), float(info["train_loss"]), seconds)


def config_from_toml(text: str):
    """The run's farsync config from the TOML text it ships (``farsync-config``)."""
    import tomllib

    from farsync.train.config import build_config

    return build_config(tomllib.loads(text))


def config_from_context(context):
    return config_from_toml(str(context.run_config["farsync-config"]))
