"""When each fragment syncs, and which settings are allowed — one home, no torch.

The algorithm (:mod:`farsync.algorithms`), the config checks (:mod:`farsync.train.config`)
and the simulator (:mod:`farsync.sim`) all ask this module, so a setting that training
refuses the simulator refuses too, with the same rule and the same message.

Symbols (the README's table maps them to every option):

=======  =================  ==========================================================
symbol   name               meaning
=======  =================  ==========================================================
M        ``workers``        workers (replicas)
H        ``inner_steps``    inner steps between two syncs of the same fragment
P        ``fragments``      fragments, synced at staggered offsets t_p = ⌊p·H/P⌋
τ        ``sync_delay``     inner steps run while a fragment's exchange is in flight
α        ``mixing``         θ_m ← α·θ_m + (1−α)·θ̃ when a sync lands
=======  =================  ==========================================================

Fragment p is sent after inner steps k·H + t_p (k ≥ 1; steps counted from 1) and lands
τ steps later. τ must be smaller than the fewest steps between two consecutive sends
(:func:`min_sync_gap`, H/P when P divides H), so at most one fragment is in flight.
"""

from __future__ import annotations

#: The methods, one flag apart: data-parallel (gradient mean every step), DiLoCo (all
#: parameters every H steps) and Streaming DiLoCo (P fragments, overlap, any codec).
MODES: tuple[str, ...] = ("dp", "diloco", "streaming")
#: How blocks are dealt to fragments: block i → fragment i mod P, or contiguous runs.
FRAGMENT_PATTERNS: tuple[str, ...] = ("strided", "sequential")
#: How a quantized mean travels (see :mod:`farsync.comm.exchange`).
EXCHANGES: tuple[str, ...] = ("auto", "reduce-scatter", "all-gather")
#: Data-parallel gradients always travel as fp32, whatever the codec setting says.
DP_CODEC = "fp32"

SYMBOLS = {"workers": "M", "inner_steps": "H", "fragments": "P", "sync_delay": "τ", "mixing": "α"}


class SettingError(ValueError):
    """A setting out of range. ``option`` names it as the caller spells it (a Python
    argument, ``algo.key`` or a simulator field), ``value`` is what was given."""

    def __init__(self, option: str, value: object, reason: str, *, message: str | None = None):
        self.option = option
        self.value = value
        self.reason = reason
        symbol = SYMBOLS.get(option.rsplit(".", 1)[-1])
        super().__init__(message or f"{option}{f' ({symbol})' if symbol else ''} = {value!r}: {reason}")


def wire_codec(mode: str, codec: str) -> str:
    """The codec an exchange of ``mode`` really uses: DP gradients travel as fp32."""
    return DP_CODEC if mode == "dp" else codec


#: α with overlap when none is given. The Streaming DiLoCo paper mixes uniformly (0.5);
#: farsync's quality benchmark measured 0.25 best of {0, 0.25, 0.5} (M = 4, τ = 1, FP4: a
#: gap to DP of +5.8 % against +8.6 % at 0.5 and +6.3 % at 0), so 0.25 is the default.
OVERLAP_MIXING = 0.25


def default_mixing(sync_delay: int) -> float:
    """α when none is given: 0 (replace, as DiLoCo) without overlap, else
    :data:`OVERLAP_MIXING` (a mix leaning to the global values)."""
    return OVERLAP_MIXING if sync_delay > 0 else 0.0


def fragment_offsets(inner_steps: int, fragments: int) -> list[int]:
    """t_p = ⌊p·H/P⌋: fragment p syncs after steps k·H + t_p, k ≥ 1."""
    return [p * inner_steps // fragments for p in range(fragments)]


def min_sync_gap(inner_steps: int, fragments: int) -> int:
    """Fewest inner steps between two consecutive fragment sends; τ must stay below it
    so that at most one fragment is in flight (it is H/P when P divides H)."""
    t = fragment_offsets(inner_steps, fragments)
    return min(b - a for a, b in zip(t, t[1:] + [inner_steps + t[0]]))


def due_fragments(step: int, inner_steps: int, fragments: int) -> list[int]:
    """Fragments whose exchange starts after inner step ``step`` (1-based count of
    completed steps)."""
    H = inner_steps
    return [f for f, t in enumerate(fragment_offsets(H, fragments)) if step - t >= H and (step - t) % H == 0]


def sync_steps(inner_steps: int, fragments: int, fragment: int, until: int) -> list[int]:
    """The inner steps (1-based counts of completed steps) after which ``fragment`` is sent."""
    t = fragment_offsets(inner_steps, fragments)[fragment]
    return list(range(inner_steps + t, until + 1, inner_steps))


def block_fragments(blocks: int, fragments: int, pattern: str) -> list[int]:
    """The fragment of each of ``blocks`` blocks: ``strided`` puts block i in fragment
    i mod P (the paper's default); ``sequential`` cuts contiguous runs whose sizes differ
    by at most one (the larger ones first)."""
    check_choice("fragment_pattern", pattern, FRAGMENT_PATTERNS)
    if pattern == "strided":
        return [i % fragments for i in range(blocks)]
    base, extra = divmod(blocks, fragments)
    out: list[int] = []
    for f in range(fragments):
        out += [f] * (base + (1 if f < extra else 0))
    return out


def check_choice(option: str, value: object, choices: tuple[str, ...]) -> None:
    """Refuse a ``value`` not among ``choices``: "option must be one of a, b (got 'x')"."""
    if value not in choices:
        listed = ", ".join(choices)
        raise SettingError(option, value, f"must be one of {listed}", message=f"{option} must be one of {listed} (got {value!r})")


def _check_int(option: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SettingError(option, value, f"must be an integer >= {low}")


def check_schedule(
    mode: str,
    *,
    inner_steps: int,
    fragments: int,
    sync_delay: int,
    mixing: float | None = None,
    prefix: str = "",
) -> None:
    """Refuse a schedule that cannot run; the one rule for training and simulator alike.

    ``prefix`` is prepended to every option name in messages (``"algo."`` for the config).
    Data-parallel ignores H, P, τ and α (only their ranges are checked); DiLoCo is
    P = 1, τ = 0, α = 0; Streaming needs P ≤ H and τ < :func:`min_sync_gap`.
    """
    def n(key: str) -> str:
        return prefix + key

    check_choice(n("mode"), mode, MODES)
    _check_int(n("inner_steps"), inner_steps, 1)
    _check_int(n("fragments"), fragments, 1)
    _check_int(n("sync_delay"), sync_delay, 0)
    if mixing is not None and not (0.0 <= mixing <= 1.0):
        raise SettingError(n("mixing"), mixing, f"must be in [0, 1], or auto (unset): 0 when τ = 0, else {OVERLAP_MIXING}")
    if mode == "dp":
        return
    if mode == "diloco":
        for key, value, wanted, why in (
            ("fragments", fragments, 1, "syncs all parameters at once"),
            ("sync_delay", sync_delay, 0, "has no overlap"),
            ("mixing", mixing if mixing is not None else 0.0, 0.0, "replaces local parameters"),
        ):
            if value != wanted:
                raise SettingError(n(key), value, f"mode 'diloco' {why}: must be {wanted:g}; use mode 'streaming'")
        return
    if fragments > inner_steps:
        raise SettingError(n("fragments"), fragments,
                           f"must be <= {n('inner_steps')} = {inner_steps} (each fragment needs its own sync step)")
    gap = min_sync_gap(inner_steps, fragments)
    if sync_delay >= gap:
        raise SettingError(
            n("sync_delay"), sync_delay,
            f"must be < {n('inner_steps')}/{n('fragments')} = {inner_steps}/{fragments}"
            + ("" if gap * fragments == inner_steps else f" (here < {gap})")
            + ", so that at most one fragment is in flight",
        )
