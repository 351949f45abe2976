"""`farsync wan` end to end: 2 emulated hosts (network namespaces + tbf), real workers.

Needs root and `ip netns` (CI has both). What is pinned down:
* a 2-host run completes and the kernel's byte counters agree with farsync's accounting;
* nothing is left behind: no namespace of the run, no new interface in our namespace,
  no worker process — after a normal run, after SIGTERM / SIGINT of `farsync wan`
  (it cleans up itself), after SIGKILL (its guardian process cleans up), and after
  SIGKILL of both it and its guardian (`farsync wan --cleanup` does);
* refusals (not root, no `ip`, bad input) are one line and exit code 2.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from farsync.cli.main import app

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

CACHE = os.path.join(os.path.dirname(__file__), "..", "..", ".cache", "farsync")
# The nano model on 1 MB of the stdlib with a 512-token BPE: seconds per run.
TINY = [
    "--model.size=nano", "--model.seq_len=64", "--data.max_bytes=1000000", "--data.val_fraction=0.1",
    "--data.vocab_size=512", "--train.batch_size=4", "--train.threads=1", "--train.progress=false",
    "--train.checkpoint_every=0", "--train.eval_batches=2", "--optim.warmup_steps=2", f"--data.cache_dir={CACHE}",
]


def _netns_unavailable() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "farsync wan needs root (network namespaces, tc)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "no `ip`/`tc` (iproute2)"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "`ip netns` does not work here"
    return None


needs_netns = pytest.mark.skipif(_netns_unavailable() is not None, reason=str(_netns_unavailable()))


def wan_cmd(tmp_path, name, *extra) -> list[str]:
    return [sys.executable, "-m", "farsync", "wan", "--workers", "2", "-q", *TINY,
            f"--train.run_dir={tmp_path}", f"--train.name={name}", *extra]


def namespaces_of(pid: int) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"fs-{pid}-")]


def interfaces() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def pids_in(names: list[str]) -> list[int]:
    pids = []
    for n in names:
        out = subprocess.run(["ip", "netns", "pids", n], capture_output=True, text=True).stdout
        pids += [int(p) for p in out.split()]
    return pids


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def guardian_of(pid: int) -> int:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if b"farsync.wan.guardian" in cmd and f"fs-{pid}-sw".encode() in cmd:
                return int(entry)
    raise AssertionError(f"no guardian process for run {pid}")


@needs_netns
def test_two_hosts_complete_counters_agree_and_nothing_is_left(tmp_path):
    before = interfaces()
    r = subprocess.run(wan_cmd(tmp_path, "dp", "--bandwidth", "20", "--json", "--algo.mode=dp",
                               "--train.steps=12", "--train.log_every=12", "--train.eval_every=12"),
                       capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout)
    assert rep["workers"] == 2 and rep["summary"]["steps"] == 12 and rep["summary"]["mode"] == "dp"
    assert rep["link"]["bandwidth_mbit"] == 20
    for h in rep["per_host"]:
        # DP: 12 exchanges of the fp32 gradient, exact from the plan
        assert h["farsync_bytes"] > 12 * 4 * 90_000
        # TCP payload the kernel sent vs farsync's count: rendezvous and metrics only
        assert abs(h["payload_vs_farsync"]) < 0.05, h
        # frames carry the headers on top: more than the payload, by a few percent
        assert 0.02 < h["wire_vs_farsync"] < 0.12, h
    assert (tmp_path / "dp" / "wan.json").exists() and (tmp_path / "dp" / "summary.json").exists()
    removed = rep["namespaces_removed"]
    assert len(removed) == 3
    pid = int(removed[0].split("-")[1])
    assert namespaces_of(pid) == []
    assert interfaces() == before


def _start_long_run(tmp_path, name):
    """A run that would take minutes; returns once both workers are training."""
    p = subprocess.Popen(wan_cmd(tmp_path, name, "--bandwidth", "2", "--timeout", "120", "--algo.mode=dp",
                                 "--train.steps=10000", "--train.log_every=10000", "--train.eval_every=10000"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / name / "wan" / "host0.log"

    def training():
        if p.poll() is not None:
            raise AssertionError(f"farsync wan exited early ({p.returncode}): {p.stderr.read()[-2000:]}")
        return log.exists() and "model:" in log.read_text(errors="replace")

    wait_for(training, 90, "the workers to start training")
    names = namespaces_of(p.pid)
    assert len(names) == 3
    workers = pids_in(names)
    assert len(workers) >= 2
    return p, names, workers


@needs_netns
def test_hosts_use_the_link_specs_congestion_control():
    # the namespaces must not inherit the machine's default: BBR at veth's RTT leaves the
    # link partly idle when both directions are loaded (BENCHMARKS.md, WAN section)
    from farsync.wan.netns import LinkSpec, Network

    def cc_of(ns: str) -> str:
        return subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-n", "net.ipv4.tcp_congestion_control"],
                              capture_output=True, text=True, check=True).stdout.strip()

    assert LinkSpec(20).congestion_control == "reno"
    with Network(2, LinkSpec(20)) as net:
        assert [cc_of(ns) for ns in net.host_names] == ["reno", "reno"]


@needs_netns
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_sigterm_or_sigint_mid_run_cleans_up(tmp_path, sig):
    before = interfaces()
    p, names, workers = _start_long_run(tmp_path, "k")
    p.send_signal(sig)
    assert p.wait(timeout=60) == 128 + sig
    assert "namespaces removed" in p.stderr.read()
    assert namespaces_of(p.pid) == []
    assert not [w for w in workers if alive(w)]
    assert interfaces() == before


@needs_netns
def test_sigkill_guardian_cleans_up(tmp_path):
    p, names, workers = _start_long_run(tmp_path, "k")
    guardian = guardian_of(p.pid)
    p.kill()
    p.wait(timeout=30)
    wait_for(lambda: namespaces_of(p.pid) == [], 30, "the guardian to remove the namespaces")
    wait_for(lambda: not [w for w in workers if alive(w)], 30, "the workers to die")
    wait_for(lambda: not alive(guardian), 30, "the guardian to exit")


@needs_netns
def test_sigkill_of_run_and_guardian_needs_cleanup_which_works(tmp_path):
    p, names, workers = _start_long_run(tmp_path, "k")
    os.kill(guardian_of(p.pid), signal.SIGKILL)
    p.kill()
    p.wait(timeout=30)
    # the workers die with their parent (PR_SET_PDEATHSIG); the namespaces stay
    wait_for(lambda: not [w for w in workers if alive(w)], 30, "the workers to die")
    assert sorted(namespaces_of(p.pid)) == sorted(names)
    r = subprocess.run([sys.executable, "-m", "farsync", "wan", "--cleanup"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert all(n in r.stdout for n in names)
    assert namespaces_of(p.pid) == []


# ---- refusals: one line, exit code 2 (no root needed) -----------------------------------
def _one_line_error(result, needle):
    text = result.stdout + result.stderr
    assert result.exit_code == 2, text
    assert needle in text and "Traceback" not in text, text
    assert len([line for line in text.splitlines() if line.strip()]) == 1, text


@pytest.fixture
def runner():
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 keeps stderr apart by default
        return CliRunner()


def test_refuses_without_root(monkeypatch, runner):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    _one_line_error(runner.invoke(app, ["wan", "--bandwidth", "10"]), "needs root")
    _one_line_error(runner.invoke(app, ["wan", "--cleanup"]), "needs root")


def test_refuses_without_ip_command(monkeypatch, runner):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "ip" else real(name, *a, **k))
    _one_line_error(runner.invoke(app, ["wan", "--bandwidth", "10"]), "`ip` command")


@pytest.mark.parametrize("args,needle", [
    (["--bandwidth", "-1"], "--bandwidth"),
    ([], "--bandwidth is required"),
    (["--bandwidth", "10", "--workers", "1"], "--workers 1"),
    (["--bandwidth", "10", "--mtu", "100"], "--mtu 100"),
    (["--bandwidth", "10", "--tcp-congestion", "no such"], "--tcp-congestion"),
    (["--bandwidth", "10", "--algo.workers=3"], "--algo.workers=3"),
    (["--bandwidth", "10", "--algo.nope=1"], "algo.nope"),
])
def test_bad_input_is_one_line(monkeypatch, runner, args, needle):
    monkeypatch.setattr(os, "geteuid", lambda: 0)  # get past the root check everywhere
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: f"/usr/sbin/{name}")
    _one_line_error(runner.invoke(app, ["wan", *args]), needle)


@needs_netns
def test_two_hosts_of_two_ranks_site_traffic_stays_off_the_link(tmp_path):
    # 2 hosts x 2 ranks (RANK = host*2 + local): each host one DDP site sharing its tbf link.
    # What the ranks of a host send each other goes to the host's own address, which the
    # kernel delivers over the namespace's loopback: eth0 carries the cross-site streams only.
    r = subprocess.run([sys.executable, "-m", "farsync", "wan", "--workers", "2", "--ranks", "2", "-q",
                        *[a for a in TINY if not a.startswith("--train.batch_size")], "--train.batch_size=2",
                        f"--train.run_dir={tmp_path}", "--train.name=site", "--bandwidth", "20", "--json",
                        "--algo.mode=dp", "--site.parallel=ddp", "--train.steps=12", "--train.log_every=12",
                        "--train.eval_every=12"], capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout)
    assert rep["workers"] == 2 and rep["ranks"] == 2 and rep["parallel"] == "ddp"
    assert rep["summary"]["site"]["ranks"] == 2
    for h in rep["per_host"]:
        # the cross-site bytes: both streams, each the fp32 shard of 12 gradients
        assert h["farsync_bytes"] > 12 * 4 * 90_000
        assert h["farsync_bytes"] == pytest.approx(2 * h["farsync_bytes_per_stream"])
        # the kernel's TCP payload on eth0 vs farsync's cross-site count: as for one rank per host.
        # Had the site's traffic (DDP's gradient all-reduce every step, the gathered mean shards)
        # taken eth0, the payload would be several times farsync's count.
        assert abs(h["payload_vs_farsync"]) < 0.05, h
        assert 0.02 < h["wire_vs_farsync"] < 0.12, h
        # ... it went over the loopback: at least the mean shards farsync gathered inside the site
        assert h["site_bytes"] > 0 and h["kernel_lo_bytes"] > h["site_bytes"], h
        assert h["own_address_route"].startswith(f"local {h['address']} dev lo"), h
    assert (tmp_path / "site" / "wan" / "host0.r0.log").exists() and (tmp_path / "site" / "wan" / "host1.r1.log").exists()
    assert len(rep["namespaces_removed"]) == 3


def test_bad_ranks_is_one_line(monkeypatch, runner):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: f"/usr/sbin/{name}")
    _one_line_error(runner.invoke(app, ["wan", "--bandwidth", "10", "--ranks", "0"]), "--ranks 0")
