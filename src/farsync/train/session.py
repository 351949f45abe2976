"""What a process does before it trains or plans with others, and undoes after: torch's
thread count, the device, and the group of workers it meets (in one process, under
torchrun, or on torchft)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from farsync.comm import rendezvous
from farsync.train import components
from farsync.train.config import Config, ConfigError


def connect(cfg: Config, dev: torch.device) -> rendezvous.Group:
    """The workers of this run: an elastic worker on torchft, one process per worker under
    torchrun, or all of them in this process. Bad settings are a ConfigError."""
    try:
        if cfg.elastic.enabled:
            from farsync.comm.heal import load_secret

            e = cfg.elastic
            return rendezvous.join_elastic(cfg.algo.workers, e.worker, lighthouse=e.lighthouse, timeout_s=e.timeout_s,
                                           connect_timeout_s=e.connect_timeout_s, quorum_timeout_s=e.quorum_timeout_s,
                                           min_workers=e.min_workers, host=e.host, secret=load_secret(e.secret_file))
        group = rendezvous.join(cfg.algo.workers, device_type=dev.type, sharded=cfg.site.parallel == "fsdp")
        if group.site is not None and cfg.algo.schedule == "time-budget":
            group.close()
            raise ConfigError("algo.schedule=time-budget needs one rank per worker: a site's ranks must train the same "
                              "steps, and their clocks differ (use lockstep or steps)")
        return group
    except (ValueError, ImportError) as e:
        raise ConfigError(str(e)) from None


@contextmanager
def session(cfg: Config) -> Iterator[tuple[rendezvous.Group, torch.device]]:
    """``train.threads`` torch threads, the device and the group while inside; the
    process left as it was found afterwards (a library call, too)."""
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        dev = components.device(cfg, rendezvous.local_rank())
        if cfg.algo.schedule == "time-budget" and not cfg.algo.round_seconds and rendezvous.launched_by_torchrun():
            raise ConfigError("algo.schedule=time-budget under torchrun needs algo.round_seconds > 0 "
                              "(the wall-clock length of a round of H steps)")
        group = connect(cfg, dev)
        try:
            yield group, dev
        finally:
            group.close()
    finally:
        torch.set_num_threads(threads)
