"""Checkpoints that a crash or Ctrl-C cannot leave half-written.

Layout in a run directory::

    checkpoints/step-000400/worker-0.pt ... worker-{M-1}.pt
    checkpoints/latest.json        {"step": 400}

Each file is written to a temporary name and renamed (atomic on POSIX). ``latest.json``
is replaced only after every worker's file of that step exists, so a resume always
finds a complete set; older steps are deleted after that.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from farsync.files import atomic_write


def step_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step-{step:06d}")


def save_worker(run_dir: str, step: int, worker: int, state: dict) -> None:
    """Write one worker's state for ``step`` (atomic)."""
    atomic_write(os.path.join(step_dir(run_dir, step), f"worker-{worker}.pt"), lambda f: torch.save(state, f))


def commit(run_dir: str, step: int, workers: int, ranks: list[int] | None = None) -> None:
    """Mark ``step`` as the checkpoint to resume from, once the files of all workers
    (or of ``ranks``: an elastic worker's run directory holds its own only) exist; then
    remove older ones."""
    d = step_dir(run_dir, step)
    missing = [w for w in (range(workers) if ranks is None else ranks) if not os.path.exists(os.path.join(d, f"worker-{w}.pt"))]
    if missing:
        raise RuntimeError(f"checkpoint of step {step} lacks worker files {missing}")
    atomic_write(os.path.join(run_dir, "checkpoints", "latest.json"),
            lambda f: f.write(json.dumps({"step": step, "workers": workers}).encode()))
    root = os.path.join(run_dir, "checkpoints")
    for name in os.listdir(root):
        if name.startswith("step-") and name != os.path.basename(d):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def latest_step(run_dir: str) -> int | None:
    path = os.path.join(run_dir, "checkpoints", "latest.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return int(json.load(f)["step"])


def load_worker(run_dir: str, step: int, worker: int, map_location=None) -> dict:
    path = os.path.join(step_dir(run_dir, step), f"worker-{worker}.pt")
    return torch.load(path, map_location=map_location, weights_only=False)
