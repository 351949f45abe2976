"""The ServerApp's round loop over a Flower ``Grid`` (see :mod:`farsync.federated.core`
for the arithmetic and :mod:`farsync.federated.messages` for the messages).

Never waits forever: a round closes at its deadline with whatever came back (its messages
carry the deadline as their TTL). The deadline follows the recent rounds
(:func:`round_deadline`: ``federated.deadline_factor`` × the median time the last
``federated.deadline_window`` rounds took to get their replies, within
[``federated.deadline_floor_s``, ``federated.round_timeout_s``]), so a lost reply costs a
few round lengths, not the whole timeout; the first round after the server starts (the
clients' start-up in it) waits ``federated.round_timeout_s``. A client that missed it (crashed,
hung, or reported an error) loses its place in the server's bookkeeping (its next work
carries θ_g in full) and sits out until ``federated.cooldown_s`` has passed (Flower drops a
dead SuperNode from the online list after about 60 s without a heartbeat; one that is still
listed after the cooldown is alive). The server checkpoints after every round and resumes
from the checkpoint when started again with the same run directory.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

from farsync.federated.core import load_flat, make_server
from farsync.federated.messages import record_to_reply, task_to_record
from farsync.train.checkpoint import load_file

#: seconds between two polls for replies
POLL_S = 0.05


def _log(msg: str) -> None:
    print(f"farsync federated: {msg}", file=sys.stderr, flush=True)


def round_deadline(reply_seconds: list[float], *, timeout_s: float, factor: float, floor_s: float,
                   window: int) -> float:
    """Seconds the next round waits for its replies, from the seconds the earlier rounds
    took to get theirs (oldest first; rounds with no reply are not in it): ``factor`` × the
    median of the last ``window``, never below ``floor_s`` nor above ``timeout_s``;
    ``timeout_s`` with no history yet or ``factor`` 0."""
    recent = reply_seconds[-window:]
    if not recent or factor == 0:
        return timeout_s
    return min(timeout_s, max(floor_s, factor * statistics.median(recent)))


def _exchange(grid, messages: dict, deadline: float) -> tuple[dict, dict, float | None]:
    """Push ``messages`` (node -> Message), pull replies until all came or ``deadline``;
    (node -> reply content, node -> why it gave none, seconds until the last reply came
    or None: none came)."""
    t0 = time.time()
    nodes = list(messages)
    ids = grid.push_messages([messages[n] for n in nodes])
    pending = {i: n for i, n in zip(ids, nodes) if i}
    failed = {n: "message refused by the SuperLink" for i, n in zip(ids, nodes) if not i}
    got, last = {}, None
    while pending and time.time() < deadline:
        for m in grid.pull_messages(list(pending)):
            n = pending.pop(m.metadata.reply_to_message_id, None)
            if n is None:
                continue
            if m.has_error():
                failed[n] = f"error {m.error.code}: {m.error.reason}"
            else:
                got[n] = m.content
                last = time.time() - t0
        if pending:
            time.sleep(POLL_S)
    for n in pending.values():
        failed[n] = f"no reply by the round's deadline ({deadline - t0:.1f} s)"
    return got, failed, last


def _train_message(content, node: int, group: str, ttl: float):
    """Flower's ``train`` message to ``node`` (inside a ServerApp: Flower fills in the run)."""
    from flwr.app import Message, MessageType

    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=group, ttl=ttl)


def run_server(grid, cfg, run_dir: str, *, new_message=_train_message) -> dict:
    """Every round of the federation; the summary (also RUN/summary.json). ``grid`` is
    Flower's (or any object with its ``get_node_ids``, ``push_messages`` and
    ``pull_messages``; ``new_message`` then makes what it pushes)."""
    from farsync.data import Corpus
    from farsync.train.components import build_model, evaluate

    a, fed = cfg.algo, cfg.federated
    os.makedirs(run_dir, exist_ok=True)
    corpus = Corpus.build(cfg.data, log=lambda m: None)
    device = torch.device("cpu")
    model = build_model(cfg, corpus.vocab_size, device)
    ckpt = os.path.join(run_dir, "server.pt")
    stats_path = os.path.join(run_dir, "clients.json")
    stats: dict[str, dict] = {}
    state = load_file(ckpt, keys=("model", "log", "held", "history")) if os.path.exists(ckpt) else None  # tensors only
    server = make_server(cfg, model, fed.rounds or cfg.train.steps // a.inner_steps)
    rounds = server.rounds  # with P fragments: the schedule's syncs
    if state is not None:
        server.load_state_dict(state)
        if os.path.exists(stats_path):
            with open(stats_path) as f:
                stats = json.load(f)
        _log(f"resumed from {ckpt} at round {server.round}")
    eval_set = corpus.eval_batches(cfg.train.batch_size, cfg.model.seq_len, cfg.train.eval_batches)

    def eval_loss() -> float:
        load_flat(model, server.model.theta)
        return evaluate(model, dict(model.named_parameters()), eval_set, device)

    rows_path = os.path.join(run_dir, "rounds.jsonl")
    cooling: dict[int, float] = {}
    reply_seconds: list[float] = []  # per round since this server started: until its last reply came
    t_run = time.time()
    while server.round < rounds:
        r = server.round
        eligible = _wait_for_clients(grid, fed.min_clients, fed.wait_clients_s, cooling, fed.cooldown_s)
        chosen = server.sample(eligible)
        deadline = round_deadline(reply_seconds, timeout_s=fed.round_timeout_s, factor=fed.deadline_factor,
                                  floor_s=fed.deadline_floor_s, window=fed.deadline_window)
        t0 = time.time()
        works = {n: server.work_for(n) for n in chosen}
        messages = {n: new_message(task_to_record(w), n, str(r), deadline) for n, w in works.items()}
        got, failed, last = _exchange(grid, messages, t0 + deadline)
        wall = time.time() - t0
        if last is not None:
            reply_seconds.append(last)
        replies, node_of = {}, {}
        for n, content in got.items():
            rep = record_to_reply(content)
            why = f"replied for round {rep.round}" if rep.round != r else server.check_reply(rep)
            if why:
                failed[n] = why
                continue
            replies[rep.client] = rep
            node_of[rep.client] = n
        for n in failed:
            server.forget(n)
            cooling[n] = time.time()
        row = server.finish_round(replies, sorted(replies))
        down = {c: works[node_of[c]].downlink_bytes() for c in replies}
        server.save(ckpt)
        train_max = max((rep.seconds.get("train", 0.0) for rep in replies.values()), default=0.0)
        row.update(round_seconds=wall, deadline_seconds=deadline, last_reply_seconds=last,
                   train_seconds_max=train_max, overhead_seconds=max(0.0, wall - train_max),
                   nodes={str(c): n for c, n in node_of.items()}, failed={str(n): why for n, why in failed.items()},
                   client_seconds={str(c): rep.seconds for c, rep in replies.items()},
                   bytes_down={str(c): n for c, n in down.items()},
                   train_loss={str(c): rep.train_loss for c, rep in replies.items()}, wall_seconds=time.time() - t_run)
        for c, rep in replies.items():
            s = stats.setdefault(str(c), {"id": c, "bytes_up": 0, "bytes_down": 0, "rounds_joined": 0, "tokens": 0})
            s["bytes_up"] += rep.uplink_bytes
            s["bytes_down"] += down[c]
            s["rounds_joined"] += 1 if c in row["kept"] else 0
            s["tokens"] += rep.trained
        start, steps = server.plan[r].start, server.plan[r].steps
        if (start + steps) // cfg.train.eval_every > start // cfg.train.eval_every or r + 1 == rounds:
            row["eval_loss"] = eval_loss()
        with open(rows_path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        with open(stats_path, "w") as f:
            json.dump(stats, f)
        _log(f"round {r + 1}/{rounds}: {len(replies)} of {len(chosen)} replied in {wall:.1f} s "
             f"(deadline {deadline:.1f} s; kept {row['kept']}"
             + (f", excluded {row['excluded']}" if row["excluded"] else "")
             + (f", failed {sorted(failed)}" if failed else "") + ")"
             + (f", eval loss {row['eval_loss']:.4f}" if "eval_loss" in row else ""))
    summary = {"run_dir": run_dir, "rounds": rounds, "final_eval_loss": eval_loss(),
               "theta_sha": _sha(server.model.theta), "clients": sorted(stats.values(), key=lambda s: s["id"]),
               "wall_seconds": time.time() - t_run}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    torch.save(server.model.theta, os.path.join(run_dir, "theta.pt"))
    _log(f"done: {rounds} rounds, eval loss {summary['final_eval_loss']:.4f}; {run_dir}/summary.json")
    return summary


def _sha(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.detach().cpu().numpy().tobytes()).hexdigest()


def _wait_for_clients(grid, at_least: int, timeout_s: float, cooling: dict[int, float], cooldown_s: float) -> list[int]:
    """Once ``at_least`` nodes are online and at least one of them is not cooling down
    after a missed deadline: those (RuntimeError after ``timeout_s``). A round never runs
    with nobody to train in it. Drops expired entries of ``cooling`` (node -> when it
    missed a deadline)."""
    end = time.time() + timeout_s
    while True:
        now = time.time()
        for n in [n for n, t in cooling.items() if now - t >= cooldown_s]:
            del cooling[n]
        online = sorted(grid.get_node_ids())
        ready = [n for n in online if n not in cooling]
        if len(online) >= at_least and ready:
            return ready
        if now > end:
            raise RuntimeError(f"only {len(online)} client(s) online ({len(ready)} not cooling down) after "
                               f"{timeout_s:g} s; federated.min_clients is {at_least}")
        time.sleep(0.5)
