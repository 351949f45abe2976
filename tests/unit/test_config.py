"""Config keys that mean "the default": no sentinels — None in Python, the key omitted in
TOML, ``auto`` on the command line; and the one ``--section.key=value`` parser."""

from __future__ import annotations

import tomllib

import pytest

from farsync.overrides import parse_override, split_args
from farsync.train.config import ConfigError, build_config, to_toml


def test_mixing_and_codec_block_size_default_to_none():
    cfg = build_config()
    assert cfg.algo.mixing is None and cfg.algo.codec_block_size is None
    assert cfg.strategy_kwargs()["mixing"] is None
    saved = tomllib.loads(to_toml(cfg))
    assert "mixing" not in saved["algo"] and "codec_block_size" not in saved["algo"]
    assert build_config(saved) == cfg  # a saved run's config rebuilds the same


@pytest.mark.parametrize("text,value", [("auto", None), ("AUTO", None), ("0.25", 0.25), ("0", 0.0)])
def test_mixing_on_the_command_line(text, value):
    assert build_config(None, [f"--algo.mixing={text}"]).algo.mixing == value


def test_recipe_values_for_optional_keys():
    assert build_config({"algo": {"mixing": 0.5, "codec_block_size": 16}}).algo.codec_block_size == 16
    with pytest.raises(ConfigError, match=r"algo.mixing must be a number \(got 'auto'\)"):
        build_config({"algo": {"mixing": "auto"}})  # TOML: omit the key instead
    with pytest.raises(ConfigError, match=r"algo.codec_block_size must be >= 1 \(got 0\)"):
        build_config(None, ["--algo.codec_block_size=0"])


def test_override_parser():
    assert parse_override("--algo.mixing=0.5") == ("algo", "mixing", "0.5")
    assert parse_override("train.name=a=b") == ("train", "name", "a=b")
    for bad in ("--steps=3", "--algo.mixing", "--.x=1", "--algo.=1"):
        with pytest.raises(ValueError, match="must look like --section.key=value"):
            parse_override(bad)
    assert split_args(["r.toml", "--algo.mode", "dp", "--train.steps=3"]) == (
        ["r.toml"], ["--algo.mode=dp", "--train.steps=3"])


def test_inner_weight_decay_is_compensated_for_the_outer_gain():
    base = ["--optim.weight_decay=0.1", "--algo.outer_lr=0.7", "--algo.outer_momentum=0.9"]
    assert build_config(None, base + ["--algo.mode=diloco", "--algo.fragments=1", "--algo.sync_delay=0"]) \
        .inner_weight_decay() == pytest.approx(0.1 / 7)
    assert build_config(None, base + ["--algo.mode=streaming"]).inner_weight_decay() == pytest.approx(0.1 / 7)
    assert build_config(None, base + ["--algo.compensate_weight_decay=false"]).inner_weight_decay() == 0.1
    assert build_config(None, base + ["--algo.mode=dp"]).inner_weight_decay() == 0.1
    # plain averaging (outer lr 1, no momentum) has gain 1: the decay is unchanged
    assert build_config(None, ["--optim.weight_decay=0.1", "--algo.outer_lr=1", "--algo.outer_momentum=0"]) \
        .inner_weight_decay() == 0.1
    with pytest.raises(ConfigError, match=r"algo.outer_momentum must be in \[0, 1\) \(got 1.0\)"):
        build_config(None, ["--algo.outer_momentum=1"])


def test_the_trainer_builds_its_inner_optimizer_with_the_compensated_decay():
    from farsync.comm import InProcessGroup
    from farsync.train.loop import build_worker

    cfg = build_config(None, ["--model.size=nano", "--optim.weight_decay=0.1", "--algo.outer_lr=0.4",
                              "--algo.outer_momentum=0.8", "--algo.workers=1"])
    w = build_worker(cfg, 0, InProcessGroup(1).communicator(0), 64, __import__("torch").device("cpu"))
    assert w.optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.1 / 2)


@pytest.mark.parametrize("args,match", [
    (["elastic.enabled=true", "algo.sync_delay=1"], "elastic.enabled needs algo.sync_delay = 0"),
    (["elastic.enabled=true", "algo.mode=dp"], "elastic.enabled needs rounds"),
    (["elastic.enabled=true", "algo.sync_delay=0", "elastic.worker=4"], r"elastic.worker must be in \[0, 3\]"),
    (["elastic.enabled=true", "algo.sync_delay=0", "elastic.min_workers=5"], r"elastic.min_workers must be in \[1, 4\]"),
    (["elastic.enabled=true", "algo.sync_delay=0", "elastic.timeout_s=0"], "elastic.timeout_s must be > 0"),
    (["train.fault=leave:x"], "leave:STEP needs a number"),
])
def test_elastic_settings_are_checked(args, match):
    with pytest.raises(ConfigError, match=match):
        build_config(None, args)


def test_the_die_hook_is_an_environment_variable_not_a_key(monkeypatch):
    from farsync.comm.faults import DieAt

    with pytest.raises(ConfigError, match="unknown key train.die_at_step"):
        build_config(None, ["train.die_at_step=3"])
    monkeypatch.setenv("FARSYNC_DIE_AT", "20:SIGTERM")
    with pytest.raises(ValueError, match="FARSYNC_DIE_AT must be STEP, STEP:SIGNAL or STEP:SIGNAL:RANK"):
        DieAt.from_env()
    monkeypatch.setenv("FARSYNC_DIE_AT", "12:SIGSTOP")
    assert DieAt.from_env() == DieAt(12, "SIGSTOP")
    monkeypatch.setenv("FARSYNC_DIE_AT", "12:SIGKILL:1")
    monkeypatch.setenv("RANK", "0")
    assert DieAt.from_env() is None  # rank 1's hook
    monkeypatch.setenv("RANK", "1")
    assert DieAt.from_env() == DieAt(12, "SIGKILL")
    monkeypatch.setenv("FARSYNC_DIE_AT", "")
    assert DieAt.from_env() is None


def test_train_help_names_every_section():
    from farsync.cli.train import HELP, SECTION_NAMES
    from farsync.train.config import SECTIONS

    assert SECTION_NAMES == tuple(SECTIONS)
    assert all(name in HELP for name in SECTIONS)


def test_lockstep_drivers_are_public():
    import farsync

    assert farsync.finish_in_lockstep is __import__("farsync.algorithms").algorithms.finish_in_lockstep
    assert "finish_in_lockstep" in farsync.__all__
