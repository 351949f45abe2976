"""The README's Python example is examples/wrap_your_loop.py, and it runs under torchrun."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(180)]


def test_readme_example_is_the_example_file():
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    example = open(os.path.join(ROOT, "examples", "wrap_your_loop.py")).read()
    assert block.strip() in example  # the README shows the file, minus its header and report


def test_example_runs_under_torchrun():
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = subprocess.run([torchrun, "--standalone", "--nproc-per-node=2", os.path.join(ROOT, "examples", "wrap_your_loop.py")],
                       capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"sent ([\d,]+) bytes, (\d+)x fewer than DP", r.stdout)
    assert m and int(m.group(2)) > 10, r.stdout
