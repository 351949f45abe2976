"""``algo.auto`` and ``farsync plan``: measure, choose, record, apply.

Every worker measures at once, over the exchange's own process group, before training:
the link (:func:`farsync.plan.link.measure_link`), then a rehearsal of training: inner
steps of a throwaway copy of the model on its first batch, all workers computing together
(so that shared CPUs or a slower GPU show), meeting every ``REHEARSAL_GAP`` steps as a sync
would. The simulator gets the mean step time, and the workers' mean wait at a meeting
(:class:`farsync.plan.choose.SyncWait`). When every worker is a site of R ranks, each rank
probes over its own cross-site group, the R of a site side by side (:class:`SiteSync`),
and the plan is made for R streams per worker over ``plan.links``. Every figure is shared over the group, and rank
0's plan is the one every worker takes; rank 0 writes it to ``RUN/plan.json``. A run that
resumes finds its ``plan.json`` and keeps that plan (its checkpoints follow its schedule).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import statistics
import time

import torch

from farsync.plan.choose import Plan, SyncWait, choose, describe
from farsync.plan.link import LinkMeasurement, SiteSync, gathered, given_link, meet, measure_link
from farsync.sim import ModelSpec

PLAN_FILE = "plan.json"
#: The rehearsal: untimed warm-up steps, then REHEARSAL_SYNCS rounds of REHEARSAL_GAP
#: timed steps, the workers meeting after each round.
WARMUP_STEPS = 3
REHEARSAL_GAP = 5
REHEARSAL_SYNCS = 8


def rehearse(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg, meet=None, *,
             gap: int = REHEARSAL_GAP, syncs: int = REHEARSAL_SYNCS, warmup: int = WARMUP_STEPS
             ) -> tuple[list[float], list[float]]:
    """Seconds of each timed inner step (forward, backward, clipping, AdamW) of a copy of
    ``model`` on the batch (x, y), and of each wait in ``meet()`` (called after the warm-up
    and after every ``gap`` timed steps; None: no meetings, one round of gap × syncs
    steps). The model itself is left as it was."""
    from farsync.train.components import inner_optimizer, local_step

    m = copy.deepcopy(model)
    opt = inner_optimizer(cfg, m)

    def step() -> float:
        t0 = time.perf_counter()
        local_step(cfg, m, opt, x, y)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(warmup):
        step()
    if meet is not None:
        meet()
    times, waits = [], []
    for _ in range(syncs):
        times += [step() for _ in range(gap)]
        if meet is not None:
            t0 = time.perf_counter()
            meet()
            waits.append(time.perf_counter() - t0)
    return times, waits


def model_shape(model: torch.nn.Module) -> tuple[int, int]:
    """(blocks, parameters) as the simulator sees the model: its block list's length
    (the one Streaming's fragments are cut from) and every trainable parameter."""
    from farsync.algorithms.fragments import find_blocks

    found = find_blocks(model)
    layers = len(found[1]) if found else 1
    return layers, sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_plan(cfg, group, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], log) -> tuple[Plan, dict]:
    """Measure (or take plan.bandwidth_mbit) and choose; the plan and its plan.json document."""
    p, M = cfg.plan, cfg.algo.workers
    transport = None
    if group.distributed:
        transport = getattr(group.comms[0], "transport", None)
        if transport is None:
            raise ValueError("algo.auto: this backend has no process group to measure the link over")
    if p.bandwidth_mbit > 0:
        link: LinkMeasurement = given_link(M, p.bandwidth_mbit, p.rtt_ms)
    elif transport is None:
        raise ValueError("algo.auto in one process has no link to measure: launch one process per worker (torchrun, "
                         "farsync wan), or give the link as --plan.bandwidth_mbit=MBIT (and --plan.rtt_ms=MS)")
    else:
        site = None if group.site is None else SiteSync(group.site.group, group.site.size, batch[0].device)
        log("plan: measuring the link between the workers ..." if site is None else
            f"plan: measuring the link between the workers, each site's {site.size} streams at once ...")
        link = measure_link(transport, min_seconds=p.probe_seconds, device=batch[0].device, site=site)
    dev = batch[0].device
    own, waited = rehearse(model, *batch, cfg, None if transport is None else lambda: meet(transport, dev))
    if transport is not None:  # every worker's figures, by worker
        every, waits_by = gathered(transport, own, dev), gathered(transport, waited, dev)
        waits = SyncWait(REHEARSAL_GAP, statistics.fmean(statistics.fmean(w) for w in waits_by))
    else:
        every, waits_by, waits = [own], [], None
    means = [statistics.fmean(w) for w in every]
    step_time = statistics.fmean(means)
    layers, params = model_shape(model)
    spec = ModelSpec("hf" if cfg.model.hf_config else cfg.model.size, layers, float(params), step_time)
    R = group.site_size
    plan = choose(spec, link, M, target=p.target_utilization, region=p.region(),
                  fragment_pattern=cfg.algo.fragment_pattern, exchange=cfg.algo.exchange, waits=waits,
                  ranks=R, links=p.links)
    log(f"plan: {link.describe()}")
    if R > 1:
        log(f"plan: every worker is a site of {R} ranks, {R} streams at once over "
            + (f"one link they share: the site's link {plan.link['sim_mbit']:.4g} Mbit/s each way" if p.links == "shared"
               else f"a link per rank of {plan.link['sim_mbit']:.4g} Mbit/s each way") + " (plan.links)")
    log(f"plan: step time {step_time * 1e3:.4g} ms (mean of {len(every)} worker(s) x {len(own)} steps; worker means "
        f"{min(means) * 1e3:.4g}-{max(means) * 1e3:.4g} ms), model {layers} blocks, {params:,} parameters"
        + (f"; workers waited {waits.wait_s * 1e3:.3g} ms for each other at meetings {REHEARSAL_GAP} steps apart"
           if waits else ""))
    for line in describe(plan):
        log(f"plan: {line}")
    doc = plan.to_dict()
    doc["step_time_s"] = {"used": step_time, "worker_means": means, "timed_steps": len(own), "by_worker": every}
    doc["sync_wait"] = None if waits is None else {"gap": waits.gap, "wait_s": waits.wait_s, "by_worker": waits_by}
    doc["workers"] = M
    return plan, doc


def apply(cfg, chosen: dict):
    """``cfg`` with the chosen algo settings (mixing back to auto when τ = 0), validated."""
    algo = dataclasses.replace(cfg.algo, mode=chosen["mode"], inner_steps=chosen["inner_steps"],
                               fragments=chosen["fragments"], sync_delay=chosen["sync_delay"], codec=chosen["codec"],
                               mixing=cfg.algo.mixing if chosen["sync_delay"] else None)
    out = dataclasses.replace(cfg, algo=algo)
    out.validate()
    return out


def plan_run(cfg, group, model: torch.nn.Module, batch, run_dir: str, log, *, keep: bool = False):
    """``algo.auto`` at the start of a run: the config to train with and the plan document
    (also in RUN/plan.json). ``keep`` (a resumed run): the plan in ``run_dir`` if it has one."""
    path = os.path.join(run_dir, PLAN_FILE)
    saved = None
    if keep and group.is_main and os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
    saved = group.broadcast(saved) if keep else None  # rank 0's run directory decides, on every worker
    if saved is not None:
        log(f"plan: keeping the plan this run started with ({path}): {saved['chosen_label']}")
        return apply(cfg, saved["chosen"]), saved
    if keep:  # its checkpoints follow the schedule in its config: planning anew could change it
        log(f"plan: {path} is missing; the resumed run keeps the algo settings of its config.toml")
        return cfg, None
    doc = shared_plan(cfg, group, model, batch, run_dir, log)
    return apply(cfg, doc["chosen"]), doc


def shared_plan(cfg, group, model: torch.nn.Module, batch, run_dir: str, log) -> dict:
    """Measure and choose (:func:`make_plan`); rank 0's plan document, on every worker
    (the same plan everywhere, whatever float noise might do), written by rank 0 to
    ``run_dir/plan.json``."""
    _, doc = make_plan(cfg, group, model, batch, log)
    doc = group.broadcast(doc)
    if group.is_main:
        path = os.path.join(run_dir, PLAN_FILE)
        os.makedirs(run_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(doc, f, indent=2)
        log(f"plan: written to {path}")
    return doc


def plan_only(cfg) -> tuple[dict, str]:
    """``farsync plan``: join the workers as training would, measure, choose; the plan
    document and where rank 0 wrote it. Nothing is trained."""
    from farsync.data import Corpus
    from farsync.train.components import build_model
    from farsync.train.metrics import log_main
    from farsync.train.session import session

    with session(cfg) as (group, dev):
        def log(msg: str) -> None:
            log_main(group, msg)

        name = cfg.train.name or group.broadcast(f"plan-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir = os.path.join(cfg.train.run_dir, name)
        corpus = Corpus.build(cfg.data, log=log)
        x, y = corpus.worker_batch(group.local_ranks[0], cfg.algo.workers, 0, cfg.train.batch_size,
                                   cfg.model.seq_len, cfg.train.seed)
        doc = shared_plan(cfg, group, build_model(cfg, corpus.vocab_size, dev), (x.to(dev), y.to(dev)), run_dir, log)
        return doc, os.path.join(run_dir, PLAN_FILE)
