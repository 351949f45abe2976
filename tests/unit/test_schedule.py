"""One schedule (farsync.schedule) for training and simulator: both accept and refuse
exactly the same settings, and the algorithm sends fragments when the schedule says."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch

from farsync import schedule
from farsync.algorithms import make_strategy
from farsync.comm import InProcessGroup
from farsync.sim import ModelSpec, SimConfig, SimInputError
from farsync.train.config import ConfigError, build_config
from toy import make_model

# 24 blocks: every P below divides it, so the simulator's own rule (equal fragments)
# never decides; what is compared is the schedule rule alone.
LAYERS = 24


def train_accepts(mode, H, P, tau) -> bool:
    try:
        build_config(None, [f"--algo.mode={mode}", f"--algo.inner_steps={H}", f"--algo.fragments={P}",
                            f"--algo.sync_delay={tau}"])
        return True
    except ConfigError:
        return False


def strategy_accepts(mode, H, P, tau) -> bool:
    model = make_model(0, n_blocks=LAYERS)
    try:
        make_strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), InProcessGroup(1).communicator(0),
                      mode=mode, inner_steps=H, fragments=P, sync_delay=tau)
        return True
    except ValueError:
        return False


def sim_accepts(mode, H, P, tau) -> bool:
    try:
        SimConfig(ModelSpec("t", LAYERS, 1e6, 1.0), mode=mode, inner_steps=H, fragments=P, sync_delay=tau)
        return True
    except SimInputError:
        return False


CASES = [
    *itertools.product(["streaming"], [1, 7, 24, 100], [1, 2, 3, 8, 12, 24], [0, 1, 3, 4, 12, 13, 50]),
    *itertools.product(["diloco"], [1, 100], [1, 2], [0, 1]),
    *itertools.product(["dp"], [1, 100], [1, 8], [0, 1, 12]),
]


@pytest.mark.parametrize("mode,H,P,tau", CASES)
def test_simulator_and_training_agree(mode, H, P, tau):
    got = {"config": train_accepts(mode, H, P, tau), "simulator": sim_accepts(mode, H, P, tau)}
    assert got["config"] == got["simulator"], got
    if mode != "dp":  # DataParallel takes no H, P, τ at all
        assert strategy_accepts(mode, H, P, tau) == got["config"]


def test_h100_p8_tau12_is_refused_everywhere():
    # offsets 0, 12, 25, 37, …: two sends only 12 steps apart, so τ = 12 would put two
    # fragments in flight even though H/P = 12.5
    assert schedule.min_sync_gap(100, 8) == 12
    assert not train_accepts("streaming", 100, 8, 12)
    assert not sim_accepts("streaming", 100, 8, 12)
    assert not strategy_accepts("streaming", 100, 8, 12)
    assert train_accepts("streaming", 100, 8, 11) and sim_accepts("streaming", 100, 8, 11)
    with pytest.raises(ConfigError, match=r"algo.sync_delay \(τ\) = 12: must be < algo.inner_steps/algo.fragments = 100/8 \(here < 12\)"):
        build_config(None, ["--algo.inner_steps=100", "--algo.fragments=8", "--algo.sync_delay=12"])


def test_schedule_functions():
    assert schedule.fragment_offsets(100, 4) == [0, 25, 50, 75]
    assert schedule.sync_steps(100, 2, 1, 300) == [150, 250]
    assert schedule.due_fragments(150, 100, 2) == [1] and schedule.due_fragments(200, 100, 2) == [0]
    assert schedule.due_fragments(50, 100, 2) == []  # the first round has no earlier anchor to sync
    assert schedule.block_fragments(6, 3, "strided") == [0, 1, 2, 0, 1, 2]
    assert schedule.block_fragments(7, 3, "sequential") == [0, 0, 0, 1, 1, 2, 2]
    assert schedule.wire_codec("dp", "fp4-e3m0") == schedule.DP_CODEC == "fp32"
    assert schedule.default_mixing(0) == 0.0 and schedule.default_mixing(1) == schedule.OVERLAP_MIXING == 0.25


@pytest.mark.parametrize("module", ["farsync", "farsync.sim", "farsync.schedule", "farsync.wan.guardian", "farsync.units"])
def test_light_modules_import_without_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_guardian_runs_without_torch():
    code = ("import runpy, sys; sys.argv = ['guardian']; sys.stdin = open('/dev/null');"
            "\ntry:\n    runpy.run_module('farsync.wan.guardian', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
