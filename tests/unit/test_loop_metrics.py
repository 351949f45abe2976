"""The training loop's metrics sum is started at one log step and read at the next.

Pinned without any clock: a sum still in flight fails the test if the loop waits on it;
rows, their order and the summary's train loss are those of a loop that waits at every
log step; pending rows land before a checkpoint, at a stop and at the end; a Ctrl-C is
agreed from the landed sum. Workers, data and checkpoints' contents are stand-ins.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import Future
from types import SimpleNamespace

import pytest
import torch

from farsync.comm import rendezvous
from farsync.train import checkpoint as ckpt
from farsync.train import loop, plots
from farsync.train.config import build_config

ROW_KEYS = ["kind", "step", "tokens", "train_loss", "lr", "wall_seconds", "bytes_sent_per_worker",
            "dp_bytes_per_worker", "sync_events"]


class Held(Future):
    """A sum still crossing the link until the test sets its result."""

    def result(self, timeout=None):
        assert self.done(), "the loop waited for a metrics sum still in flight"
        return super().result(timeout)


class HeldGroup:
    """A group whose sums complete only when the test releases them."""

    is_main, distributed, local_ranks, site, site_size = True, False, [0, 1], None, 1  # one process simulating both workers

    def __init__(self, workers: int = 2):
        self.started: list[tuple[list[float], Held]] = []
        self.summed_workers = workers  # the sum adds every worker's values

    def all_sum_async(self, values):
        f = Held()
        self.started.append((list(values), f))
        return f


def fake_worker(rank):
    state = dict
    return SimpleNamespace(
        rank=rank, last_loss=float("nan"),
        model=SimpleNamespace(state_dict=state), optimizer=SimpleNamespace(state_dict=state),
        scheduler=SimpleNamespace(state_dict=state, get_last_lr=lambda: [0.5]),
        algo=SimpleNamespace(state_dict=state, stats=SimpleNamespace(total_bytes=0, dp_equivalent_bytes=0, sync_events=0, num_parameters=0,
                                                                      tokens=0), steps_trained=0, drain_events=list),
    )


def make_run(tmp_path, *args, group=None):
    cfg = build_config(None, ["--algo.workers=2", "--train.steps=12", "--train.log_every=2", "--train.eval_every=6",
                              "--train.checkpoint_every=0", "--train.progress=false", *args])
    group = group or rendezvous.Group(0, 2, False, [], [0, 1])
    os.makedirs(tmp_path, exist_ok=True)
    return loop.Trainer(cfg, group, torch.device("cpu"), str(tmp_path), None, [fake_worker(r) for r in range(2)],
                        eval_model=None, eval_set=[], n_params=0)


def tokens_per_step(run):
    """Tokens all workers train on in one step."""
    return run.cfg.algo.workers * run.cfg.train.batch_size * run.cfg.model.seq_len


def log_step(run, done):
    run.step = done
    run.log_step()


def rows(run, wall=False):
    with open(run.metrics.path) as f:
        return [{k: v for k, v in json.loads(x).items() if wall or k != "wall_seconds"} for x in f]


def test_log_step_starts_the_sum_and_writes_the_row_when_it_lands(tmp_path):
    group = HeldGroup()
    run = make_run(tmp_path, group=group)
    run.metrics.open(run.cfg, 0)
    per = tokens_per_step(run) // 2  # one worker's tokens a step
    for w, loss in zip(run.workers, (1.0, 3.0)):
        w.last_loss, w.algo.stats.total_bytes, w.algo.stats.tokens = loss, 100, 2 * per
    log_step(run, 2)  # fails inside if it waits for the sum
    assert rows(run) == [] and len(group.started) == 1
    assert group.started[0][0] == [4.0, 0.0, 200.0, 4.0 * per]  # this process's share: losses, Ctrl-C, bytes, tokens

    run.metrics.write({"kind": "eval", "step": 2, "eval_loss": 9.0})  # logged after the train row of step 2
    assert rows(run) == []
    group.started[0][1].set_result([10.0, 0.0, 600.0, 4.0 * per])  # the other processes' shares added
    log_step(run, 4)  # lands step 2, starts step 4 (not waited for)
    got = rows(run, wall=True)
    assert [(r["kind"], r["step"]) for r in got] == [("train", 2), ("eval", 2)]
    assert list(got[0]) == ROW_KEYS
    assert got[0]["train_loss"] == 5.0 and got[0]["bytes_sent_per_worker"] == 300.0 and run.metrics.train_loss == 5.0
    assert got[0]["tokens"] == 2 * tokens_per_step(run) and got[0]["lr"] == 0.5

    group.started[1][1].set_result([2.0, 0.0, 0.0, 0.0])
    run.metrics.land()  # a drain: before a checkpoint, at a stop, at the end
    assert [(r["kind"], r["step"]) for r in rows(run)] == [("train", 2), ("eval", 2), ("train", 4)]
    assert run.metrics.train_loss == 1.0 and run.metrics.pending is None
    run.metrics.land()  # nothing pending: nothing written
    assert len(rows(run)) == 3
    run.close()


def test_ctrl_c_is_agreed_from_the_landed_sum_not_before(tmp_path):
    group = HeldGroup()
    run = make_run(tmp_path, group=group)
    run.stop.requested = True  # this process saw Ctrl-C
    log_step(run, 2)
    assert group.started[0][0][1] == 1.0 and not run.metrics.stop_agreed
    group.started[0][1].set_result([0.0, 1.0, 0.0, 0.0])
    log_step(run, 4)
    assert run.metrics.stop_agreed

    other = make_run(tmp_path, group=HeldGroup())  # another process, which saw nothing
    log_step(other, 2)
    other.group.started[0][1].set_result([0.0, 1.0, 0.0, 0.0])  # the same sum lands there
    log_step(other, 4)
    assert other.metrics.stop_agreed


def fake_train_step(ctrl_c_at=None):
    def train_step(run):
        step = run.step
        for w in run.workers:
            w.last_loss = 1.0 / (step + 1) + 0.25 * w.rank
            w.algo.stats.total_bytes += 10 * (w.rank + 1)
            w.algo.stats.sync_events += 1
            w.algo.stats.tokens += tokens_per_step(run) // len(run.workers)
        if step + 1 == ctrl_c_at:
            run.stop.requested = True
        return True

    return train_step


@pytest.fixture
def fake_loop(monkeypatch):
    """The real loop, log_step, save and finish over stand-in steps, eval and summary;
    ``blocking=True`` runs the loop as it was: each log step waits for its sum."""
    monkeypatch.setattr(loop, "finish_in_lockstep", lambda algos: None)
    monkeypatch.setattr(loop.Trainer, "eval_loss", lambda run: 7.0)
    monkeypatch.setattr(loop.Trainer, "summary", lambda run, final_eval: {"final_train_loss": run.metrics.train_loss})
    monkeypatch.setattr(plots, "plot_run", lambda run_dir: None)
    deferred = loop.Trainer.log_step

    def waiting_log_step(run):
        deferred(run)
        run.metrics.land()

    def go(run, ctrl_c_at=None, blocking=False):
        monkeypatch.setattr(loop.Trainer, "train_step", fake_train_step(ctrl_c_at))
        monkeypatch.setattr(loop.Trainer, "log_step", waiting_log_step if blocking else deferred)
        return run.loop()

    return go


@pytest.mark.parametrize("args", [[], ["--train.checkpoint_every=5"], ["--train.log_every=5"], ["--train.log_every=1"]])
def test_rows_and_final_train_loss_equal_a_loop_that_waits(tmp_path, fake_loop, args):
    waits = make_run(tmp_path / "waits", *args)
    waits_summary = fake_loop(waits, blocking=True)
    run = make_run(tmp_path / "deferred", *args)
    summary = fake_loop(run)
    assert rows(run) == rows(waits)
    assert summary == waits_summary and summary["final_train_loss"] == pytest.approx(1.0 / 12 + 0.125)
    got = rows(run)
    log_every = run.cfg.train.log_every
    assert [r["step"] for r in got if r["kind"] == "train"] == sorted({*range(log_every, 13, log_every), 12})
    assert got[-1] == {"kind": "eval", "step": 12, "tokens": 12 * tokens_per_step(run), "eval_loss": 7.0}
    assert ckpt.latest_step(run.run_dir) == 12


@pytest.mark.parametrize("args,stop", [
    ([], 6),  # Ctrl-C after step 3: in the sum started at step 4, which lands at step 6
    (["--train.checkpoint_every=5"], 5),  # landed before the checkpoint of step 5: stops there
])
def test_ctrl_c_stops_where_the_sum_lands_with_every_row_before_the_checkpoint(tmp_path, fake_loop, args, stop):
    run = make_run(tmp_path, *args)
    out = fake_loop(run, ctrl_c_at=3)
    assert out == {"stopped_at": stop, "run_dir": run.run_dir}
    assert ckpt.latest_step(run.run_dir) == stop
    assert [(r["kind"], r["step"]) for r in rows(run)] == [("train", 2), ("train", 4)] + (
        [("train", 6), ("eval", 6)] if stop == 6 else [])
