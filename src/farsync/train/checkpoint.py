"""Checkpoints that a crash or Ctrl-C cannot leave half-written, and that can run no code.

Layout in a run directory::

    checkpoints/step-000400/worker-0.pt ... worker-{M-1}.pt
    checkpoints/latest.json        {"step": 400, "workers": M, "kept": [200, 400]}

Each file is written to a temporary name and renamed (atomic on POSIX). ``latest.json``
is replaced only after every worker's file of that step exists, so a resume always
finds a complete set; the newest ``train.keep_checkpoints`` steps are kept (``kept``),
older ones deleted after that.

A worker file holds tensors and plain data only, and is read with
``torch.load(weights_only=True)``: a file holding anything else (a pickle whose
``__reduce__`` runs a command, say) is refused before any of it runs. A resume checks
every file of the newest step first (:func:`resume_step`); a damaged one (truncated,
random bytes, missing, or a damaged ``latest.json``) is named in one line and the
previous complete step is used.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from farsync.files import atomic_write

#: what every worker file of a training checkpoint holds
WORKER_KEYS = ("model", "optimizer", "scheduler", "algo", "step")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file (one line)."""


def step_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step-{step:06d}")


def worker_path(run_dir: str, step: int, worker: int) -> str:
    return os.path.join(step_dir(run_dir, step), f"worker-{worker}.pt")


def _latest_path(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints", "latest.json")


def save_worker(run_dir: str, step: int, worker: int, state: dict) -> None:
    """Write one worker's state for ``step`` (atomic)."""
    atomic_write(worker_path(run_dir, step, worker), lambda f: torch.save(state, f))


def _step_dirs(run_dir: str) -> list[int]:
    """The steps that have a folder under checkpoints/, ascending."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        if name.startswith("step-") and name[5:].isdigit():
            steps.append(int(name[5:]))
    return sorted(steps)


def _read_latest(run_dir: str) -> dict:
    """latest.json as a dict with an int ``step`` and a list ``kept``; CheckpointError
    naming the file if it is not that."""
    path = _latest_path(run_dir)
    try:
        with open(path, "rb") as f:
            d = json.loads(f.read().decode("utf-8"))
        step = d["step"]
        kept = d.get("kept", [step])
        if not isinstance(step, int) or isinstance(step, bool) or not isinstance(kept, list) \
                or not all(isinstance(k, int) and not isinstance(k, bool) for k in kept):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{path}: damaged (not the JSON farsync writes)") from None
    return {"step": step, "kept": sorted(set(kept) | {step})}


def commit(run_dir: str, step: int, workers: int, ranks: list[int] | None = None, keep: int = 2) -> None:
    """Mark ``step`` as the checkpoint to resume from, once the files of all workers
    (or of ``ranks``: an elastic worker's run directory holds its own only) exist; keep
    it and the ``keep`` - 1 committed steps before it, remove the others (also any
    after it: a run resumed from an earlier step has abandoned them)."""
    d = step_dir(run_dir, step)
    missing = [w for w in (range(workers) if ranks is None else ranks) if not os.path.exists(os.path.join(d, f"worker-{w}.pt"))]
    if missing:
        raise RuntimeError(f"checkpoint of step {step} lacks worker files {missing}")
    existing = _step_dirs(run_dir)
    try:
        before = _read_latest(run_dir)["kept"] if os.path.exists(_latest_path(run_dir)) else []
    except CheckpointError:
        before = existing
    kept = ([k for k in before if k < step and k in existing] + [step])[-max(1, keep):]
    atomic_write(_latest_path(run_dir),
                 lambda f: f.write(json.dumps({"step": step, "workers": workers, "kept": kept}).encode()))
    for s in existing:
        if s not in kept:
            shutil.rmtree(step_dir(run_dir, s), ignore_errors=True)


def latest_step(run_dir: str) -> int | None:
    """The step latest.json names (None without one); CheckpointError if it is damaged."""
    if not os.path.exists(_latest_path(run_dir)):
        return None
    return _read_latest(run_dir)["step"]


def has_checkpoint(run_dir: str) -> bool:
    """Whether ``run_dir`` holds a checkpoint to resume from, usable or not."""
    return os.path.exists(_latest_path(run_dir)) or bool(_step_dirs(run_dir))


def _why(e: BaseException) -> str:
    msg = str(e)
    low = msg.lower()
    if "unsupported global" in low or "unsupported operand" in low or "unsupported class" in low or "is blocked" in low:
        return "holds Python objects, not only tensors and plain data (refused; nothing in it was run)"
    if isinstance(e, EOFError) or "central directory" in msg or "truncated" in msg.lower():
        return "truncated or not a checkpoint"
    first = msg.strip().splitlines()[0][:160] if msg.strip() else type(e).__name__
    return f"not a checkpoint ({first})"


def load_file(path: str, map_location=None, *, mmap: bool = False, keys: tuple[str, ...] = ()) -> dict:
    """A farsync ``.pt`` file: tensors and plain data only (``weights_only=True``: no
    pickled object is ever built, so no code in the file runs). CheckpointError, one
    line naming the file, for a missing, truncated, foreign or code-carrying file, or a
    dict without ``keys``."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":  # torch.save's zip format, the only one farsync writes
        what = ("a raw pickle (refused unread; nothing in it was run)" if head[:1] == b"\x80"
                else "empty" if not head else "random bytes or another format")
        raise CheckpointError(f"{path}: not a checkpoint: {what}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for a bad file
        raise CheckpointError(f"{path}: {_why(e)}") from None
    if not isinstance(obj, dict) or any(k not in obj for k in keys):
        raise CheckpointError(f"{path}: not a farsync checkpoint (no {', '.join(keys) or 'dict'} in it)")
    return obj


def load_worker(run_dir: str, step: int, worker: int, map_location=None) -> dict:
    """Worker ``worker``'s state at ``step`` (see :func:`load_file`)."""
    return load_file(worker_path(run_dir, step, worker), map_location, keys=WORKER_KEYS)


def _damage(run_dir: str, step: int, workers: list[int]) -> list[str]:
    """What is wrong with the files of ``step``: one note per damaged file."""
    notes = []
    for w in workers:
        try:
            load_file(worker_path(run_dir, step, w), "cpu", mmap=True, keys=WORKER_KEYS)
        except CheckpointError as e:
            notes.append(str(e))
    return notes


def resume_step(run_dir: str, workers: list[int], log=None) -> int | None:
    """The newest committed step whose files of ``workers`` all load: None if the run
    has no checkpoint at all. A damaged newer one is named (one line to ``log``) and
    passed over; CheckpointError naming every damaged file if none is usable."""
    notes: list[str] = []
    try:
        candidates = _read_latest(run_dir)["kept"] if os.path.exists(_latest_path(run_dir)) else None
    except CheckpointError as e:
        notes.append(str(e))
        candidates = None
    if candidates is None:  # no pointer, or a damaged one: every step folder is a candidate
        candidates = _step_dirs(run_dir)
        if not candidates and not notes:
            return None
    for step in sorted(candidates, reverse=True):
        bad = _damage(run_dir, step, workers)
        if not bad:
            if notes and log is not None:
                log(f"checkpoint: damaged: {'; '.join(notes)}; resuming from step {step}, the newest complete one")
            return step
        notes.extend(bad)
    raise CheckpointError(f"{run_dir}: no usable checkpoint: {'; '.join(notes) or 'no step folder under checkpoints/'}")
