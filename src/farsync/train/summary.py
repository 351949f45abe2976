"""A finished run's figures: ``summary.json``."""

from __future__ import annotations

import json
import math
import os


#: per-rank figures a site's worker adds up over its ranks (the rest are the same on every
#: rank, or, for time, spent side by side: the mean)
_SUMMED = ("bytes_sent", "control_bytes", "site_bytes", "total_bytes", "tokens", "peak_event_bytes")
_MEAN = ("compute_seconds", "blocked_seconds")


def by_worker(per_rank: list[dict], ranks: int) -> list[dict]:
    """One accounting per worker from one per process: a worker that is a site of
    ``ranks`` ranks (consecutive entries) sent what its ranks sent together — each its
    shard — and spent, side by side, their mean time."""
    if ranks == 1:
        return per_rank
    out = []
    for i in range(0, len(per_rank), ranks):
        site = per_rank[i:i + ranks]
        w = dict(site[0])
        for k in _SUMMED:
            w[k] = sum(s[k] for s in site)
        for k in _MEAN:
            w[k] = sum(s[k] for s in site) / ranks
        busy = w["compute_seconds"] + w["blocked_seconds"]
        w["compute_utilization"] = w["compute_seconds"] / busy if busy > 0 else 1.0
        w["dp_bytes_ratio"] = w["dp_equivalent_bytes"] / w["total_bytes"] if w["total_bytes"] else None
        out.append(w)
    return out


def summarize(trainer, final_eval: float, elastic: dict | None = None) -> dict:
    """The summary of ``trainer``'s run (a :class:`farsync.train.loop.Trainer` at its end):
    every worker's accounting gathered, data-parallel's bytes for the same steps, compute
    utilization, unequal workers, exclusions; ``elastic``: what an elastic worker saw of
    failures."""
    cfg, wall_s, group = trainer.cfg, trainer.wall(), trainer.group
    per_worker = by_worker(group.gather_workers([w.algo.stats.to_dict() for w in trainer.workers]), group.site_size)
    algo = trainer.workers[0].algo
    sent = [s["total_bytes"] for s in per_worker]
    dp = max(s["dp_equivalent_bytes"] for s in per_worker)  # the workers that trained every step
    compute = sum(s["compute_seconds"] for s in per_worker)
    blocked = sum(s["blocked_seconds"] for s in per_worker)
    tokens = sum(s["tokens"] for s in per_worker)
    plan = trainer.plan
    summary = {
        "run_dir": trainer.run_dir,
        "mode": cfg.algo.mode,
        "workers": cfg.algo.workers,
        "backend": group.backend,
        "model": trainer.model_name,
        "parameters": trainer.n_params,
        "steps": cfg.train.steps,
        "tokens": tokens,
        "wall_seconds": wall_s,
        "tokens_per_second": tokens / wall_s if wall_s > 0 else None,
        "final_eval_loss": final_eval,
        "final_train_loss": trainer.metrics.train_loss,
        "codec": cfg.algo.wire_codec,
        "bytes_sent_per_worker": sent,
        "bytes_sent_total": sum(sent),
        "dp_equivalent_bytes_per_worker": dp,
        "dp_bytes_ratio": dp / max(sent) if max(sent) else None,
        "peak_bytes_per_sync": max(s["peak_event_bytes"] for s in per_worker),
        "sync_events": per_worker[0]["sync_events"],
        "compute_seconds": compute,
        "blocked_seconds": blocked,
        "compute_utilization": compute / (compute + blocked) if compute + blocked > 0 else 1.0,
        "worker_speeds": trainer.pacing.speeds,
        "schedule": cfg.algo.schedule,
        # in-process with unequal speeds: the wall clock real workers of those speeds would take
        "simulated_wall_seconds": trainer.pacing.sim_seconds or None,
        "per_worker": [
            {k: s[k] for k in ("tokens", "inner_steps", "idle_steps", "rounds_joined", "rounds_sat_out",
                               "rounds_excluded", "rounds_skipped", "total_bytes", "compute_seconds", "blocked_seconds")}
            for s in per_worker
        ],
        # a worker that is a site of several ranks: the bytes above cross between sites (each
        # rank its shard, over its own stream); these stay inside the site
        "site": None if group.site is None else {
            "ranks": group.site.size, "parallel": cfg.site.parallel,
            "site_bytes_per_worker": [s["site_bytes"] for s in per_worker],
            "cross_site_bytes_per_stream": [s["total_bytes"] / group.site.size for s in per_worker]},
        "exclusions": algo.exclusions,
        "skipped_rounds": algo.skipped_rounds,
        # elastic: what this worker saw of failures (every event is a metrics.jsonl row)
        "elastic": elastic,
        # algo.auto: what was chosen and predicted (measured figures beside it above; all in plan.json)
        "plan": None if plan is None else {
            "chosen": plan["chosen_label"], "target_utilization": plan["target_utilization"],
            "predicted_utilization": plan["predicted_utilization"],
            "predicted_dp_bytes_ratio": plan["predicted_dp_bytes_ratio"],
            "measured_mbit": plan["link"]["measured_mbit"], "rtt_ms": plan["link"]["rtt_ms"],
            "link_given": plan["link"]["given"], "step_time_s": plan["step_time_s"]["used"]},
    }
    summary["failure"] = failure(summary)
    return summary


def failure(s: dict) -> str | None:
    """Why a run that trained to its end produced nothing usable (None: it did): its
    final eval loss is not a finite number, or every one of its rounds was skipped (θ_g
    never moved). `farsync train` then exits with code 1, the summary written."""
    loss = s["final_eval_loss"]
    if loss is None or not math.isfinite(loss):
        return (f"the final eval loss is {loss}: training diverged (try a lower optim.lr or algo.outer_lr); "
                f"see {os.path.join(s['run_dir'], 'summary.json')}")
    rounds, skipped = s["sync_events"], len(s["skipped_rounds"])
    if s["mode"] != "dp" and rounds and skipped >= rounds:
        return (f"every round of the run was skipped ({skipped} of {rounds}: fewer than algo.min_contributions "
                "pseudo-gradients kept), so θ_g is the initial model; see the skipped rows in metrics.jsonl")
    return None


def write_summary(run_dir: str, summary: dict) -> None:
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
