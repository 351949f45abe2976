"""The metrics of a run: ``metrics.jsonl`` rows, TensorBoard / W&B, the progress bar, and
the summing of each log step's figures over the processes.

A log step's figures (train loss, bytes sent, tokens, whether anyone pressed Ctrl-C) are
summed over the processes while training goes on: the sum is started at one log step
and its row written when it lands, at the next (:meth:`Metrics.log_step`; also before
every checkpoint and at the end, :meth:`Metrics.land`), so the loop never waits for it on
the link. Rows logged meanwhile are written after it, in order.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import IO, Any

from farsync.units import format_bytes

METRICS_FILE = "metrics.jsonl"


def log_main(group, msg: str) -> None:
    """Progress messages: the main process speaks (on stderr)."""
    if group.is_main:
        print(msg, file=sys.stderr, flush=True)


@dataclass
class _Pending:
    """A log step's train row whose sum over the processes is still in flight."""

    sums: Future  # of [Σ train loss, Σ Ctrl-C seen, Σ bytes sent, Σ tokens], over every worker
    row: dict  # the row, train_loss and bytes_sent_per_worker still None
    after: list[dict] = field(default_factory=list)  # rows logged since, written after it


class Metrics:
    """Rows of one run (written on the main process only), and the pending log step.

    ``group`` sums over processes (``all_sum_async``) and says how many workers a sum
    adds up (``summed_workers``) and whether this process writes (``is_main``).
    """

    def __init__(self, run_dir: str, group):
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.group = group
        self.file: IO[str] | None = None
        self.trackers: Any = None  # TensorBoard / W&B (train.loggers.Trackers), when asked for
        self.bar: Any = None  # the progress bar
        self.pending: _Pending | None = None
        self.train_loss: float | None = None  # set when a log step's sum lands
        self.stop_agreed = False  # a landed sum says some process saw Ctrl-C
        self.rows = 0  # rows in metrics.jsonl (main process): a checkpoint records it

    def open(self, cfg, start: int) -> None:
        """Append to metrics.jsonl; start the trackers and the progress bar (main process)."""
        if not self.group.is_main:
            return
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.rows = sum(1 for _ in f)
        self.file = open(self.path, "a")
        if cfg.train.tensorboard or cfg.train.wandb:
            import dataclasses

            from farsync.train.loggers import Trackers

            run_dir = os.path.dirname(self.path)
            self.trackers = Trackers(run_dir, os.path.basename(os.path.normpath(run_dir)), dataclasses.asdict(cfg),
                                     tensorboard=cfg.train.tensorboard, wandb=cfg.train.wandb)
        if cfg.train.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.train.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)

    def write(self, row: dict) -> None:
        """Append ``row`` (main process), after the pending log step's row."""
        if self.file is None:
            return
        if self.pending is not None:
            self.pending.after.append(row)
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.rows += 1
        if self.trackers is not None:
            self.trackers.log(row)

    def log(self, msg: str) -> None:
        """A line on stderr, from the main process."""
        log_main(self.group, msg)

    def log_step(self, row: dict, local: list[float]) -> None:
        """Land the previous log step's sum, a log interval old and so normally done, then
        start this one's: ``local`` = this process's [Σ train loss, Ctrl-C seen, Σ bytes
        sent, Σ tokens] over its workers. ``row`` is written when the sum lands."""
        self.land()
        self.pending = _Pending(self.group.all_sum_async(local), row)

    def land(self) -> None:
        """Wait for the pending log step's sum; write its row, then the rows logged behind
        it. Every process lands the same sum at the same step, so a Ctrl-C it carries is
        agreed at the same step everywhere."""
        p, self.pending = self.pending, None
        if p is None:
            return
        total = p.sums.result()
        m = self.group.summed_workers
        self.train_loss = total[0] / (m * self.group.site_size)  # every rank of a site reports its share's loss
        if total[1] > 0:
            self.stop_agreed = True
        p.row.update(train_loss=self.train_loss, bytes_sent_per_worker=total[2] / m, tokens=int(total[3]))
        for row in (p.row, *p.after):
            self.write(row)
        if self.bar is not None:
            r = p.row
            self.bar.set_postfix(loss=f"{self.train_loss:.3f}", tok_s=f"{r['tokens'] / max(r['wall_seconds'], 1e-9):,.0f}",
                                 sent=format_bytes(r["bytes_sent_per_worker"]), refresh=False)

    def events(self, events: list[dict], extra: dict | None = None) -> None:
        """A strategy's events (:meth:`~farsync.algorithms.Strategy.drain_events`): a row
        each, ``extra`` added to sync rows; a line on stderr for an exclusion or a skipped
        round."""
        for e in events:
            kind = e["kind"]
            self.write({**e, **(extra or {})} if kind == "sync" else e)
            if kind == "excluded":
                self.log(f"left out worker {e['worker']}'s pseudo-gradient, fragment {e['fragment']} round {e['round']} "
                         f"(step {e['step']}): {e['why']}")
            elif kind == "skipped":
                self.log(f"skipped round {e['round']} of fragment {e['fragment']} (step {e['step']}): only workers "
                         f"{e['kept']} left, fewer than algo.min_contributions; θ_g unchanged")

    def drop_rows_after(self, step: int) -> None:
        """A resume from ``step``: rows past it belong to steps that will run again."""
        if self.group.is_main and os.path.exists(self.path):
            with open(self.path) as f:
                rows = [r for r in f if json.loads(r)["step"] <= step]
            with open(self.path, "w") as f:
                f.writelines(rows)

    def keep_first_rows(self, count: int) -> None:
        """A resume from a checkpoint taken when metrics.jsonl had ``count`` rows: the
        rows written after it belong to steps that will run again."""
        if self.group.is_main and os.path.exists(self.path):
            with open(self.path) as f:
                rows = f.readlines()[:count]
            with open(self.path, "w") as f:
                f.writelines(rows)

    def fresh(self) -> None:
        """A new run: no rows from an earlier one."""
        if self.group.is_main and os.path.exists(self.path):
            os.unlink(self.path)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.close_bar()
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None
