"""What the simulator needs to know about a model: layers, parameters, step time.

The Streaming DiLoCo paper (arXiv 2501.18512, §3.1, Table 4) simulates three models and
gives their pure-compute step times directly; those are the presets. For any other model,
give the step time, or derive it from FLOPs, hardware peak and MFU (`ModelSpec.from_flops`).

MFU is an open choice the paper does not state: it hides inside the step time. Every MFU
change is a step-time change, ``step_time ∝ 1 / MFU``; use `ModelSpec.scaled` to ask
"what if my MFU is half the paper's?" (step time × 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from farsync.schedule import SettingError


#: A bad simulator input: the same error the schedule rules raise (`option` names the
#: setting as in the API, `value` is what was given); the CLI maps `option` to its flag.
SimInputError = SettingError


@dataclass(frozen=True)
class ModelSpec:
    """A model as the simulator sees it.

    layers: transformer blocks L; each contributes one forward, one backward-wrt-activations,
        one backward-wrt-parameters and one reduction node per step (4L - 1 nodes: the
        first block's input needs no activation gradient).
    params: parameters N, spread evenly over the L blocks (embeddings and head are folded
        into the blocks; the paper's DAG has only per-layer nodes).
    step_time: seconds of pure compute for one inner step (forward + backward) of one
        worker, with no communication at all.
    """

    name: str
    layers: int
    params: float
    step_time: float

    def __post_init__(self) -> None:
        if not isinstance(self.layers, int) or self.layers < 1:
            raise SimInputError("layers", self.layers, "must be an integer >= 1")
        if not (self.params > 0 and math.isfinite(self.params)):
            raise SimInputError("params", self.params, "must be a positive number")
        if not (self.step_time > 0 and math.isfinite(self.step_time)):
            raise SimInputError("step_time", self.step_time, "must be positive seconds")

    @classmethod
    def from_flops(
        cls,
        layers: int,
        params: float,
        *,
        peak_flops: float,
        mfu: float,
        tokens_per_step: float | None = None,
        flops_per_step: float | None = None,
        accelerators: int = 1,
        name: str = "custom",
    ) -> "ModelSpec":
        """Step time from work and hardware.

        flops_per_step: FLOPs of one inner step of one worker; if omitted,
            6 · params · tokens_per_step (forward 2N + backward 4N per token).
        peak_flops: peak FLOP/s of one accelerator (e.g. 989e12 for H100 bf16 dense).
        mfu: model FLOPs utilization in (0, 1].
        accelerators: accelerators inside one worker sharing the step.
        step_time = flops_per_step / (accelerators · peak_flops · mfu).
        """
        if not (0 < mfu <= 1):
            raise SimInputError("mfu", mfu, "must be in (0, 1]")
        if not (peak_flops > 0 and math.isfinite(peak_flops)):
            raise SimInputError("peak_flops", peak_flops, "must be positive FLOP/s")
        if not isinstance(accelerators, int) or accelerators < 1:
            raise SimInputError("accelerators", accelerators, "must be an integer >= 1")
        if flops_per_step is None:
            if tokens_per_step is None or not tokens_per_step > 0:
                raise SimInputError(
                    "tokens_per_step", tokens_per_step,
                    "give tokens per step (or flops_per_step) to derive the step time",
                )
            flops_per_step = 6.0 * params * tokens_per_step
        if not flops_per_step > 0:
            raise SimInputError("flops_per_step", flops_per_step, "must be positive")
        step_time = flops_per_step / (accelerators * peak_flops * mfu)
        return cls(name=name, layers=layers, params=params, step_time=step_time)

    def scaled(self, compute_slowdown: float) -> "ModelSpec":
        """The same model with step time × `compute_slowdown` (= old MFU / new MFU)."""
        if not compute_slowdown > 0:
            raise SimInputError("compute_slowdown", compute_slowdown, "must be positive")
        return replace(self, step_time=self.step_time * compute_slowdown)


# Table 4 of Streaming DiLoCo: sizes, depths and pure-compute step times as the paper
# gives them. The paper does not say which MFU or hardware these step times assume.
PRESETS: dict[str, ModelSpec] = {
    "1b": ModelSpec("1b", layers=24, params=1e9, step_time=0.1),
    "10b": ModelSpec("10b", layers=48, params=1e10, step_time=0.8),
    "100b": ModelSpec("100b", layers=108, params=1e11, step_time=4.9),
}

#: The paper fixes 3 layers per fragment for Streaming DiLoCo (8 / 16 / 36 fragments).
LAYERS_PER_FRAGMENT = 3
#: Inner steps per round in Table 4.
PAPER_INNER_STEPS = 100


def preset(name: str) -> ModelSpec:
    """A Table 4 model by name ('1b', '10b', '100b')."""
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise SimInputError(
            "preset", name, f"unknown preset (choose from {', '.join(PRESETS)})"
        ) from None
