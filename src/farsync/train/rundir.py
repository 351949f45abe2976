"""What a run may do to its run directory: never replace a run by accident, and never
let a resume change the run it continues.

* A new run refuses a run directory that already holds something (:func:`fresh_problem`):
  resume it, choose another ``train.name``, or pass ``train.overwrite=true`` (which
  empties it first). ``train.name`` is a plain folder name (``TrainConfig``).
* ``--resume`` takes only the overrides that change neither the run's trajectory nor
  the rows it writes (:data:`RESUME_KEYS`); :func:`check_resume` refuses the others in
  one line, before anything is written.
"""

from __future__ import annotations

import os
import shutil
import tomllib

#: the keys a resumed run may change: they steer the display, the trackers, how often
#: it checkpoints and how an elastic worker reaches the others — never a parameter, a
#: batch, a learning rate or a metrics row. (train.steps is not among them: the
#: learning-rate schedule decays over train.steps and the final syncs land at its end,
#: so a longer run is another run; nor are eval_every, eval_batches, log_every, which
#: change the rows, nor threads and device, which change the floating-point rounding.)
RESUME_KEYS = (
    "train.progress", "train.tensorboard", "train.wandb", "train.checkpoint_every", "train.keep_checkpoints",
    "train.launch",
    "elastic.lighthouse", "elastic.host", "elastic.secret_file", "elastic.timeout_s", "elastic.connect_timeout_s",
    "elastic.quorum_timeout_s", "elastic.join_timeout_s",
)

#: keys that say where the run is, not what it does: a resume ignores them
_PLACE_KEYS = ("train.run_dir", "train.name")


def _flat(cfg) -> dict[str, object]:
    """The config as saved (farsync.train.config.to_toml: keys a mode ignores omitted),
    as section.key → value."""
    from farsync.train.config import to_toml

    return {f"{s}.{k}": v for s, body in tomllib.loads(to_toml(cfg)).items() for k, v in body.items()}


def resume_changes(saved, cfg) -> list[str]:
    """The keys whose value ``cfg`` changes from the run's ``saved`` config that a resume
    may not change. With algo.auto the plan's own choices are the run's (its plan.json)."""
    a, b = _flat(saved), _flat(cfg)
    skip = set(RESUME_KEYS) | set(_PLACE_KEYS)
    if saved.algo.auto:
        skip |= {"algo.mode", "algo.inner_steps", "algo.fragments", "algo.sync_delay", "algo.codec"}
    # plan.* only bound a plan, and a resumed run keeps its own (plan.json, or its config's settings)
    return sorted(k for k in set(a) | set(b) if k not in skip and not k.startswith("plan.") and a.get(k) != b.get(k))


def check_resume(saved, cfg, run_dir: str) -> None:
    """ConfigError (one line) if ``cfg`` changes ``saved`` where a resume may not."""
    from farsync.train.config import ConfigError

    if cfg.train.overwrite:
        raise ConfigError(f"--resume {run_dir} continues the run there and train.overwrite=true would replace it: "
                          "give one of them")
    changed = resume_changes(saved, cfg)
    if changed:
        a, b = _flat(saved), _flat(cfg)
        what = ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:4]) + (" ..." if len(changed) > 4 else "")
        raise ConfigError(f"--resume {run_dir} continues the run as it was: it cannot change {what}; a resume takes "
                          f"only {', '.join(RESUME_KEYS)} and plan.* (train.steps changes the learning-rate schedule: a longer "
                          "run is a new run, under another train.name)")


def saved_config(run_dir: str):
    """The run's config.toml as a Config (ConfigError naming the file if it is not one)."""
    from farsync.train.config import build_config

    return build_config(read_recipe(os.path.join(run_dir, "config.toml")))


#: what a run leaves in its run directory (README, "What a run leaves behind"); a folder
#: holding none of them (say the wan/ folder `farsync wan` writes first) holds no run
RUN_FILES = ("config.toml", "metrics.jsonl", "summary.json", "checkpoints", "plan.json", "loss.png", "bytes.png",
             "workers.png", "tensorboard", "wandb")


def holds_run(run_dir: str) -> bool:
    """Whether ``run_dir`` holds anything a run leaves there."""
    return any(os.path.exists(os.path.join(run_dir, name)) for name in RUN_FILES)


def fresh_problem(run_dir: str, *, finished_only: bool = False) -> str | None:
    """Why a new run cannot start in ``run_dir`` (None: it can): it is a file, or it
    already holds a run (``finished_only``: a finished one)."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        return f"{run_dir} is a file, not a run directory"
    finished = os.path.exists(os.path.join(run_dir, "summary.json"))
    if finished:
        return f"{run_dir} already holds a finished run"
    if not finished_only and holds_run(run_dir):
        return f"{run_dir} already holds a run"
    return None


def refusal(problem: str, run_dir: str) -> str:
    return (f"{problem}: resume it with --resume {run_dir}, choose another train.name, or pass "
            "--train.overwrite=true to replace it")


def empty(run_dir: str) -> None:
    """train.overwrite: remove what a run left in the run directory."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        os.unlink(run_dir)
        return
    for name in RUN_FILES:
        path = os.path.join(run_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)


def read_recipe(path: str) -> dict:
    """:func:`farsync.train.config.load_recipe`, with a file that is not text named too."""
    from farsync.train.config import ConfigError, load_recipe

    try:
        return load_recipe(path)
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {path!r} is not a TOML text file (not UTF-8 text)") from None


def default_name(cfg) -> str:
    """What a run without train.name is called: mode-codec-timestamp."""
    import time

    return f"{cfg.algo.mode}-{cfg.algo.wire_codec}-{time.strftime('%Y%m%d-%H%M%S')}"
