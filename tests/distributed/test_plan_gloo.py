"""`--algo.auto=true` under torchrun: two gloo processes measure the link and rehearse,
agree on one plan, and train exactly the run that plan describes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib

CACHE = os.path.join(os.path.dirname(__file__), "..", "..", ".cache", "farsync")
FAST = ["--model.size=nano", "--model.seq_len=64", "--data.max_bytes=1000000", "--data.val_fraction=0.1",
        "--data.vocab_size=512", "--train.batch_size=4", "--train.eval_every=10", "--train.eval_batches=2",
        "--train.log_every=5", "--train.threads=1", "--train.progress=false", "--optim.warmup_steps=2",
        "--train.steps=20", "--train.checkpoint_every=0", "--algo.workers=2", f"--data.cache_dir={CACHE}"]


def test_torchrun_workers_measure_agree_on_a_plan_and_train_it(tmp_path):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    args = [*FAST, f"--train.run_dir={tmp_path}", "--plan.max_inner_steps=10", "--plan.probe_seconds=0.02"]
    r = subprocess.run([torchrun, "--standalone", "--nproc-per-node=2", "-m", "farsync", "train", *args,
                        "--algo.auto=true", "--train.name=auto"], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "plan: link measured between 2 workers" in r.stderr
    doc = json.loads((tmp_path / "auto" / "plan.json").read_text())
    link = doc["link"]
    assert not link["given"] and link["measured_mbit"] > 0 and link["rtt_s"] > 0
    assert link["sizes"] and all(len(s["seconds"]) == 3 for s in link["sizes"])
    assert set(link["rtt_by_peer"]) == {"1"} and len(link["rtt_by_peer"]["1"]) == 10
    assert len(doc["step_time_s"]["by_worker"]) == 2 and len(doc["sync_wait"]["by_worker"]) == 2
    assert doc["candidates"][0]["why_not"] == "" and all(c["why_not"] for c in doc["candidates"][1:])
    c = {k: doc["chosen"][k] for k in ("mode", "inner_steps", "fragments", "sync_delay", "codec")}
    summary = json.loads((tmp_path / "auto" / "summary.json").read_text())
    assert summary["plan"]["chosen"] == doc["chosen_label"] and summary["backend"] == "torch.distributed"

    # the planned run is the run its settings describe: the same in one process, bit for bit
    saved = tomllib.loads((tmp_path / "auto" / "config.toml").read_text())["algo"]
    assert {k: saved[k] for k in c} == c
    same = [f"--algo.{k}={v}" for k, v in c.items()]
    r = subprocess.run([sys.executable, "-m", "farsync", "train", *args, *same, "--train.name=same"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((tmp_path / "same" / "summary.json").read_text())
    for key in ("final_eval_loss", "final_train_loss", "bytes_sent_per_worker", "sync_events"):
        assert again[key] == summary[key], key


def test_sites_probe_their_streams_together_and_plan_for_the_shared_link(tmp_path):
    # 2 workers x 2 ranks: rank r of each site probes over its own cross-site group, the two
    # ranks of a site side by side (they align every timed exchange and stop the ramp together,
    # or this would hang); the plan is for 2 streams per worker sharing the site's link
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    args = [*[a for a in FAST if not a.startswith("--train.batch_size")], "--train.batch_size=2",
            f"--train.run_dir={tmp_path}", "--plan.max_inner_steps=10", "--plan.probe_seconds=0.02"]
    r = subprocess.run([torchrun, "--standalone", "--nproc-per-node=4", "-m", "farsync", "plan", *args,
                        "--train.name=sites"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "each site's 2 streams at once" in r.stderr and "site of 2 ranks" in r.stderr
    doc = json.loads((tmp_path / "sites" / "plan.json").read_text())
    assert doc["ranks"] == 2 and doc["links"] == "shared" and doc["link"]["streams"] == 2
    assert doc["link"]["sim_mbit"] == 2 * doc["link"]["measured_mbit"]
    assert set(doc["link"]["rtt_by_peer"]) == {"1"}  # over the cross-site group: one peer
