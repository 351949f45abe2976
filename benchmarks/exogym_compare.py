"""farsync's default `farsync train` against exogym (exo-explore/gym) on the same job, side by
side on this machine.

The job: the micro model (160k parameters) on farsync's tokenized standard-library corpus,
4 workers of 4 × 128 tokens per step, DiLoCo with H = 10 (AdamW lr 4e-3 inside, Nesterov SGD
lr 0.7 momentum 0.8 outside), 200 steps, one torch thread per worker. exogym simulates each
node as a process (torch.multiprocessing spawn, gloo); farsync runs `farsync train
recipes/diloco.toml`, whose default (train.launch=auto) on a machine with 2+ cores is one
process per worker, and again with train.launch=inprocess (all workers in one process).

exogym is installed from a checkout of its repository into a throwaway virtual
environment (never a dependency of farsync): `--exogym-src DIR` (a checkout; exogym 0.1.0a2 on
PyPI is an empty placeholder). Its runtime needs only torch, numpy, tqdm, einops and psutil; the
venv gets the same torch wheel as farsync's.

    python benchmarks/exogym_compare.py --exogym-src /path/to/gym [--repeats 2]

Writes benchmarks/results/exogym.json and exogym.png. Each variant runs --repeats times,
alternating; the figure is the command's wall time (start to exit: process start, data,
training, evaluation of the last model), and tokens/s = 4 × 4 × 128 × 200 ÷ that. Beside it,
``training_seconds``: farsync's own (summary.json's wall_seconds: from the first step on) and
exogym's Trainer.fit (which includes starting its node processes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS, WORKERS, BATCH, SEQ, H = 200, 4, 4, 128, 10
TOKENS = STEPS * WORKERS * BATCH * SEQ

# The exogym side: farsync's model and token array, exogym's trainer and DiLoCo strategy.
EXOGYM_JOB = r'''
import os, sys, time
import numpy as np
import torch

import torch.distributed as dist

from farsync.models.llama import Llama, model_config

# exogym 0.1.0a2 pins GLOO_SOCKET_IFNAME to "lo0" (macOS's loopback), which Linux does not
# have: name this machine's loopback instead, in every node process (they import this file)
_init = dist.init_process_group


def _on_loopback(*args, **kwargs):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    return _init(*args, **kwargs)


dist.init_process_group = _on_loopback

SEQ, BATCH, H, STEPS, WORKERS = {seq}, {batch}, {H}, {steps}, {workers}
TOKENS = np.load({tokens!r})


class Windows(torch.utils.data.Dataset):
    """Node ``rank``'s contiguous share of the token stream, as (x, y) windows."""

    def __init__(self, rank, n):
        per = len(TOKENS) // n
        self.ids = torch.from_numpy(TOKENS[rank * per:(rank + 1) * per].astype(np.int64))
        self.n = (len(self.ids) - 1) // SEQ

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        w = self.ids[i * SEQ: i * SEQ + SEQ + 1]
        return w[:-1], w[1:]


def dataset(rank, num_nodes, train_dataset):
    return Windows(rank if train_dataset else 0, num_nodes)


class WithLoss(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.m = Llama(model_config("micro", 512, SEQ))

    def forward(self, batch):
        x, y = batch
        return self.m(x, y)[1]


if __name__ == "__main__":
    from exogym import Trainer
    from exogym.strategy import DiLoCoStrategy
    from exogym.strategy.optim import OptimSpec

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    strategy = DiLoCoStrategy(optim_spec=OptimSpec(torch.optim.AdamW, lr=4e-3, weight_decay=0.01),
                              outer_optim_spec=OptimSpec(torch.optim.SGD, lr=0.7, momentum=0.8, nesterov=True), H=H)
    trainer = Trainer(WithLoss(), dataset, dataset, device="cpu", start_port=29000 + os.getpid() % 1000)
    trainer.fit(num_epochs=1, strategy=strategy, num_nodes=WORKERS, max_steps=STEPS, batch_size=BATCH,
                minibatch_size=BATCH, val_size=BATCH, val_interval=10 * STEPS, shuffle=False, run_name="compare")
    print("EXOGYM_FIT_SECONDS", time.perf_counter() - t0, flush=True)
'''


def sh(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


def make_venv(venv: Path, src: Path) -> Path:
    """A throwaway venv with exogym (from ``src``, no dependencies) and what it imports."""
    py = venv / "bin" / "python"
    if not py.exists():
        sh([sys.executable, "-m", "venv", str(venv)])
        import torch

        sh([str(py), "-m", "pip", "install", "--quiet", f"torch=={torch.__version__.split('+')[0]}", "numpy", "tqdm",
            "einops", "psutil"])
        sh([str(py), "-m", "pip", "install", "--quiet", "--no-deps", str(src)])
    return py


def tokens_file(work: Path) -> str:
    """farsync's training tokens of the default corpus, as a .npy file in ``work``."""
    sys.path.insert(0, str(ROOT / "src"))
    import numpy as np

    from farsync.data import Corpus
    from farsync.train.config import build_config, load_recipe

    os.chdir(ROOT)  # the token cache is relative to the repository
    cfg = build_config(load_recipe(str(ROOT / "recipes" / "diloco.toml")))
    path = work / "tokens.npy"
    np.save(path, Corpus.build(cfg.data, log=lambda m: None).train_tokens.numpy())
    return str(path)


def run_exogym(py: Path, job: Path) -> tuple[float, float]:
    """(the command's wall time, exogym's Trainer.fit time: its node processes' start and training)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    t0 = time.perf_counter()
    out = sh([str(py), str(job)], env=env, cwd=tempfile.gettempdir()).stdout
    wall = time.perf_counter() - t0
    fit = next(float(line.split()[1]) for line in out.splitlines() if line.startswith("EXOGYM_FIT_SECONDS"))
    return wall, fit


def run_farsync(launch: str, run_dir: Path, i: int) -> tuple[float, dict]:
    name = f"{launch}-{i}"
    t0 = time.perf_counter()
    sh([str(ROOT / ".venv" / "bin" / "farsync"), "train", str(ROOT / "recipes" / "diloco.toml"), f"--train.steps={STEPS}",
        f"--train.launch={launch}", f"--train.run_dir={run_dir}", f"--train.name={name}", "--train.progress=false",
        "--train.eval_every=1000", "--train.eval_batches=1", "--train.checkpoint_every=0", "--train.overwrite=true"],
       cwd=ROOT)
    wall = time.perf_counter() - t0
    return wall, json.loads((run_dir / name / "summary.json").read_text())


def _cpu() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--exogym-src", required=True, help="a checkout of github.com/exo-explore/gym")
    ap.add_argument("--venv", default=os.path.join(tempfile.gettempdir(), "exogym-venv"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    py = make_venv(Path(args.venv), Path(args.exogym_src))
    version = sh([str(py), "-c", "import importlib.metadata as m; print(m.version('exogym'))"]).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="exogym-compare-"))
    job = work / "exogym_job.py"
    job.write_text(EXOGYM_JOB.format(seq=SEQ, batch=BATCH, H=H, steps=STEPS, workers=WORKERS, tokens=tokens_file(work)))
    walls: dict[str, list[float]] = {"farsync (default: processes)": [], "farsync (inprocess)": [], "exogym": []}
    train_s: dict[str, list[float]] = {"farsync (default: processes)": [], "farsync (inprocess)": [], "exogym": []}
    for i in range(args.repeats):
        for key, launch in (("farsync (default: processes)", "auto"), ("farsync (inprocess)", "inprocess")):
            w, s = run_farsync(launch, work / "runs", i)
            walls[key].append(w)
            train_s[key].append(s["wall_seconds"])
            print(f"{key}: {w:.1f} s (training {s['wall_seconds']:.1f} s), eval loss {s['final_eval_loss']:.4f}",
                  flush=True)
        w, fit = run_exogym(py, job)
        walls["exogym"].append(w)
        train_s["exogym"].append(fit)
        print(f"exogym: {w:.1f} s (Trainer.fit {fit:.1f} s)", flush=True)
    rows = {k: {"wall_seconds": v, "median_wall_seconds": statistics.median(v),
                "tokens_per_second": TOKENS / statistics.median(v),
                "training_seconds": train_s.get(k)} for k, v in walls.items()}
    ratio = rows["farsync (default: processes)"]["tokens_per_second"] / rows["exogym"]["tokens_per_second"]
    result = {
        "benchmark": "exogym_compare", "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "cpu": _cpu(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "job": {"model": "micro", "workers": WORKERS, "batch": BATCH, "seq_len": SEQ, "H": H, "steps": STEPS,
                "tokens": TOKENS, "threads_per_worker": 1},
        "exogym_version": version, "runs": rows,
        "target": {"what": "farsync's default command >= 1.4x exogym's tokens/s", "value": ratio, "met": ratio >= 1.4},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "exogym.json").write_text(json.dumps(result, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(rows)
    ax.barh(names, [rows[n]["tokens_per_second"] for n in names], color=["tab:blue", "tab:cyan", "tab:gray"])
    ax.set_xlabel("tokens/s (command wall time, median)")
    ax.set_title(f"the same DiLoCo job, 4 workers, {os.cpu_count()} cores: farsync {ratio:.2f}× exogym")
    fig.tight_layout()
    fig.savefig(out / "exogym.png", dpi=120)
    print(json.dumps(result["target"]))


if __name__ == "__main__":
    main()
