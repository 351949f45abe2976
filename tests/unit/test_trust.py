"""Trust nothing on disk: checkpoints that would run code, damaged checkpoints, bad data
files and bad numbers are refused in one line naming the file or key (issue 24)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from farsync.train import checkpoint as ckpt
from farsync.train.config import ConfigError, build_config


class Evil:
    """Unpickling this runs a shell command (creates a file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def evil_file(path, marker, *, raw: bool = False):
    """A .pt file whose unpickling creates ``marker``: torch.save's zip format, or a raw pickle."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if raw:
        import pickle

        with open(path, "wb") as f:
            pickle.dump({"model": Evil(marker)}, f)
    else:
        torch.save({"model": Evil(marker), "optimizer": {}, "scheduler": {}, "algo": {}, "step": 1}, path)


def worker_state(step):
    return {"model": {"w": torch.full((3,), float(step))}, "optimizer": {}, "scheduler": {}, "algo": {}, "step": step}


def saved_run(tmp_path, steps=(10, 20), workers=2, keep=2):
    run = str(tmp_path / "run")
    for s in steps:
        for w in range(workers):
            ckpt.save_worker(run, s, w, worker_state(s))
        ckpt.commit(run, s, workers, keep=keep)
    return run


@pytest.mark.parametrize("raw", [False, True])
def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path, raw):
    marker = tmp_path / "ran"
    path = str(tmp_path / "worker-0.pt")
    evil_file(path, marker, raw=raw)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_file(path)
    assert str(e.value).startswith(path) and "nothing in it was run" in str(e.value)
    assert len(str(e.value).splitlines()) == 1
    assert not marker.exists()


def test_last_k_checkpoints_are_kept(tmp_path):
    run = saved_run(tmp_path, steps=(10, 20, 30), keep=2)
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["latest.json", "step-000020", "step-000030"]
    assert json.load(open(os.path.join(run, "checkpoints", "latest.json")))["kept"] == [20, 30]
    assert ckpt.resume_step(run, [0, 1]) == 30
    # a run resumed from step 20 that commits 25: step 30 belonged to the abandoned future
    for w in range(2):
        ckpt.save_worker(run, 25, w, worker_state(25))
    ckpt.commit(run, 25, 2, keep=2)
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["latest.json", "step-000020", "step-000025"]
    one = saved_run(tmp_path / "one", steps=(10, 20), keep=1)
    assert sorted(os.listdir(os.path.join(one, "checkpoints"))) == ["latest.json", "step-000020"]


@pytest.mark.parametrize("damage", ["truncated", "missing", "random", "evil"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_naming_the_file(tmp_path, damage):
    run = saved_run(tmp_path)
    bad = ckpt.worker_path(run, 20, 1)
    marker = tmp_path / "ran"
    if damage == "truncated":
        data = open(bad, "rb").read()
        open(bad, "wb").write(data[: len(data) // 2])
    elif damage == "missing":
        os.unlink(bad)
    elif damage == "random":
        open(bad, "wb").write(os.urandom(2000))
    else:
        evil_file(bad, marker)
    said = []
    assert ckpt.resume_step(run, [0, 1], log=said.append) == 10
    assert len(said) == 1 and bad in said[0] and "resuming from step 10" in said[0]
    assert ckpt.worker_path(run, 20, 0) not in said[0]  # only the damaged file is named
    assert not marker.exists()


def test_a_corrupt_latest_json_is_named_and_the_step_folders_are_used(tmp_path):
    run = saved_run(tmp_path)
    latest = os.path.join(run, "checkpoints", "latest.json")
    open(latest, "wb").write(b"\x00garbage{")
    said = []
    assert ckpt.resume_step(run, [0, 1], log=said.append) == 20
    assert len(said) == 1 and latest in said[0]


def test_no_usable_checkpoint_is_one_line_naming_every_damaged_file(tmp_path):
    run = saved_run(tmp_path)
    names = [ckpt.worker_path(run, 20, 0), ckpt.worker_path(run, 10, 1)]
    for n in names:
        open(n, "wb").write(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.resume_step(run, [0, 1])
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and all(n in msg for n in names) and "no usable checkpoint" in msg
    assert ckpt.resume_step(str(tmp_path / "nothing"), [0]) is None


def test_a_federated_client_or_server_file_that_is_not_tensors_is_refused_naming_it(tmp_path):
    from farsync.data import Corpus
    from farsync.federated.core import Client
    from farsync.federated.rounds import run_server

    cache = os.path.join(os.path.dirname(__file__), "..", "..", ".cache", "farsync")
    cfg = build_config(None, ["model.size=nano", "model.seq_len=32", "data.max_bytes=300000", "data.vocab_size=300",
                              "data.val_fraction=0.1", f"data.cache_dir={cache}", "train.eval_batches=1",
                              "algo.workers=2"])
    corpus = Corpus.build(cfg.data, log=lambda m: None)
    marker = tmp_path / "ran"
    evil_file(str(tmp_path / "client-0.pt"), marker)
    with pytest.raises(ValueError, match=f"^{tmp_path / 'client-0.pt'}: holds Python objects"):
        Client(cfg, 0, str(tmp_path), corpus)
    evil_file(str(tmp_path / "server" / "server.pt"), marker)
    with pytest.raises(ValueError, match=f"^{tmp_path / 'server' / 'server.pt'}: holds Python objects"):
        run_server(None, cfg, str(tmp_path / "server"))  # refused before the grid is used
    assert not marker.exists()


@pytest.mark.parametrize("override", ["optim.lr=inf", "optim.lr=nan", "algo.outer_lr=-inf", "optim.weight_decay=inf",
                                      "elastic.timeout_s=inf", "algo.mixing=nan"])
def test_non_finite_numbers_are_refused(override):
    with pytest.raises(ConfigError, match="must be a finite number"):
        build_config(None, [override])


def test_a_recipe_of_infinity_is_refused(tmp_path):
    from farsync.train.rundir import read_recipe

    (tmp_path / "r.toml").write_text("[optim]\nlr = inf\n")
    with pytest.raises(ConfigError, match="optim.lr must be a finite number"):
        build_config(read_recipe(str(tmp_path / "r.toml")))
    (tmp_path / "bin.toml").write_bytes(b"\x7fELF\x02\x01\x01\x00\xff\xfe" * 10)
    with pytest.raises(ConfigError, match=f"recipe '{tmp_path / 'bin.toml'}' is not a TOML text file"):
        read_recipe(str(tmp_path / "bin.toml"))


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".", " x", "/abs"])
def test_a_run_name_cannot_leave_the_run_folder(name):
    with pytest.raises(ConfigError, match="train.name must be a plain folder name"):
        build_config(None, [f"train.name={name}"])


def test_checkpoint_every_longer_than_the_run_checkpoints_half_way():
    assert build_config(None, ["train.steps=100"]).train.checkpoint_interval() == 50
    assert build_config(None, ["train.steps=100", "train.checkpoint_every=30"]).train.checkpoint_interval() == 30
    assert build_config(None, ["train.steps=100", "train.checkpoint_every=0"]).train.checkpoint_interval() == 0
    assert build_config(None, ["train.steps=1"]).train.checkpoint_interval() == 0


def test_resume_refuses_what_changes_the_trajectory_and_takes_the_rest():
    from farsync.train.rundir import check_resume

    saved = build_config(None, ["train.steps=40"])
    check_resume(saved, build_config(None, ["train.steps=40", "train.progress=false", "train.checkpoint_every=5",
                                            "train.name=other", "elastic.timeout_s=20", "plan.codecs=int8"]), "R")
    check_resume(saved, build_config(None, ["train.steps=40", "algo.inner_steps=20"]), "R")  # the same value
    for override, key in [("algo.inner_steps=10", "algo.inner_steps"), ("algo.workers=3", "algo.workers"),
                          ("train.steps=80", "train.steps"), ("train.eval_every=5", "train.eval_every"),
                          ("train.threads=2", "train.threads"), ("optim.lr=0.1", "optim.lr")]:
        with pytest.raises(ConfigError, match=f"cannot change {key}") as e:
            check_resume(saved, build_config(None, ["train.steps=40", override]), "R")
        assert len(str(e.value).splitlines()) == 1
    with pytest.raises(ConfigError, match="train.overwrite=true would replace it"):
        check_resume(saved, build_config(None, ["train.steps=40", "train.overwrite=true"]), "R")


def test_dp_config_omits_the_keys_it_ignores():
    import tomllib

    from farsync.train.config import to_toml

    text = to_toml(build_config(None, ["algo.mode=dp", "algo.fragments=3", "algo.codec=int8", "train.overwrite=true"]))
    d = tomllib.loads(text)
    assert d["algo"]["mode"] == "dp" and "fragments" not in d["algo"] and "codec" not in d["algo"]
    assert "inner_steps" not in d["algo"] and "overwrite" not in d["train"]
    assert build_config(d).algo.mode == "dp"  # still a valid recipe
    assert "fragments" in tomllib.loads(to_toml(build_config(None, ["algo.mode=streaming"])))["algo"]
