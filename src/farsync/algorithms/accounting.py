"""Per-worker communication and time accounting."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


def dp_bytes_per_step(workers: int, num_parameters: int) -> int:
    """Bytes one worker sends per step in data-parallel training: a ring all-reduce of
    fp32 gradients (:data:`farsync.schedule.DP_CODEC`) sends 2(M−1)/M × 4 bytes × parameters."""
    return round(2 * (workers - 1) / workers * 4 * num_parameters)


@dataclass
class CommStats:
    """What one worker has sent and how it spent its time, since the start of the run."""

    workers: int  # M
    num_parameters: int
    inner_steps: int = 0
    sync_events: int = 0  # completed exchanges (one per fragment sync; one per step in DP)
    bytes_sent: int = 0  # payload bytes sent for parameter/gradient exchange
    control_bytes: int = 0  # bytes sent for the weight/validity handshake
    site_bytes: int = 0  # bytes sent inside a site (its ranks gathering the mean; not the slow link)
    peak_event_bytes: int = 0  # most bytes sent in one sync event
    blocked_seconds: float = 0.0  # time waiting for exchanges to finish (the strategy records it)
    compute_seconds: float = 0.0  # time in inner compute: forward, backward, inner step
    tokens: int = 0  # tokens trained on (as the driver reports them; steps if it does not)
    idle_steps: int = 0  # schedule steps this worker sat out (slower than the schedule)
    rounds_joined: int = 0  # syncs whose result includes this worker's contribution
    rounds_sat_out: int = 0  # syncs it took no part in (weight 0: not sampled, or nothing trained)
    rounds_excluded: int = 0  # syncs where the receivers left its contribution out
    rounds_skipped: int = 0  # syncs with too few contributions: θ_g left as it was
    # (the driver records it with add_compute: only it knows where one worker's compute
    # starts and ends when several simulated workers share a thread)

    def record_event(self, payload_bytes: int, control_bytes: int, site_bytes: int = 0) -> None:
        self.sync_events += 1
        self.bytes_sent += payload_bytes
        self.control_bytes += control_bytes
        self.site_bytes += site_bytes
        self.peak_event_bytes = max(self.peak_event_bytes, payload_bytes + control_bytes)

    def add_compute(self, seconds: float) -> None:
        self.compute_seconds += seconds

    @property
    def dp_equivalent_bytes(self) -> int:
        """Bytes data-parallel training would have sent for the same inner steps."""
        return self.inner_steps * dp_bytes_per_step(self.workers, self.num_parameters)

    @property
    def total_bytes(self) -> int:
        return self.bytes_sent + self.control_bytes

    @property
    def compute_utilization(self) -> float:
        """Compute time ÷ (compute + blocked) — the share of time not spent waiting."""
        busy = self.compute_seconds + self.blocked_seconds
        return self.compute_seconds / busy if busy > 0 else 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total_bytes"] = self.total_bytes
        d["dp_equivalent_bytes"] = self.dp_equivalent_bytes
        d["dp_bytes_ratio"] = self.dp_equivalent_bytes / self.total_bytes if self.total_bytes else None
        d["compute_utilization"] = self.compute_utilization
        return d

    def load_dict(self, d: dict) -> None:
        for f in fields(self):
            if f.name in d:
                setattr(self, f.name, d[f.name])
