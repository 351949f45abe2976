"""Optional experiment trackers: TensorBoard and Weights & Biases, rank 0 only, fed the
same rows as ``metrics.jsonl`` (train rows: loss, lr, bytes; eval rows: eval loss),
indexed by step. Neither package is a dependency: asking for one that is not installed
is a one-line error naming the extra to install (checked with the config)."""

from __future__ import annotations

import importlib.util
import os

#: train.wandb values
WANDB_MODES = ("", "offline", "online")

#: metrics.jsonl fields sent to the trackers, by row kind
FIELDS = {
    "train": ("train_loss", "lr", "bytes_sent_per_worker", "dp_bytes_per_worker", "tokens"),
    "eval": ("eval_loss",),
}


def check_available(tensorboard: bool, wandb: str) -> None:
    """ValueError naming the extra when a requested tracker's package is missing."""
    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("train.tensorboard needs the tensorboard package: pip install 'farsync[tensorboard]'")
    if wandb and importlib.util.find_spec("wandb") is None:
        raise ValueError("train.wandb needs the wandb package: pip install 'farsync[wandb]'")


class Trackers:
    """The trackers a run asked for, writing under its run directory."""

    def __init__(self, run_dir: str, name: str, config: dict, *, tensorboard: bool = False, wandb: str = ""):
        self._tb = self._wb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"))
        if wandb:
            import wandb as wb

            self._wb = wb.init(mode=wandb, dir=run_dir, project="farsync", name=name, config=config,
                               settings=wb.Settings(silent=True))

    def log(self, row: dict) -> None:
        """One metrics.jsonl row (other kinds than train and eval are not scalars: skipped)."""
        fields = FIELDS.get(row.get("kind"), ())
        values = {f"{row['kind']}/{k}": row[k] for k in fields if row.get(k) is not None}
        if not values:
            return
        step = row["step"]
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, global_step=step)
        if self._wb is not None:
            self._wb.log(values, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wb is not None:
            self._wb.finish()
            self._wb = None
