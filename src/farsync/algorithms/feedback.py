"""Error feedback: what a lossy codec drops from one payload goes into the next.

    e ← β·e + Δ,   send Q(e),   e ← e − Q(e)

Q is exactly what the receivers decode, so nothing the codec drops is lost: it is sent
later (β < 1 forgets a share of it each round). With a sparse top-k codec this is
SparseLoCo's accumulator (arXiv 2508.15706), which stands in for the outer momentum.
DiLoCo's workers (one residual per fragment), the federated clients (their uplink) and
the federated server (its downlink) all use :func:`compensate`.
"""

from __future__ import annotations

import torch


def compensate(codec, delta: torch.Tensor, residual: torch.Tensor | None, decay: float = 1.0,
               sends: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(what to send, the new residual) for pseudo-gradient ``delta`` (1-D fp32, updated in
    place) and the last ``residual`` (None: none yet). Q is ``codec`` on the buffer zero-
    padded to its alignment — what an all-gather payload or a shard-aligned reduce-scatter
    payload decodes to. ``sends`` False (nothing goes out this round): the residual keeps
    all of e."""
    if residual is not None:
        if decay == 1.0:
            delta.add_(residual)
        else:
            delta.add_(residual, alpha=decay)
    if not sends:
        return delta, delta.clone()
    n, a = delta.numel(), codec.alignment
    padded = torch.nn.functional.pad(delta, (0, -n % a))
    sent = codec.decode(codec.encode(padded), padded.numel())[:n]
    return delta, delta - sent.to(delta.device)
