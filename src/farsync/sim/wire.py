"""Bytes on the wire per codec, as the simulator counts them.

This table is deliberately local: the simulator is pure Python and must not depend on
`farsync.codecs` (which does the real encoding). The sizes follow the codec family named
in DESIGN.md §2; if the real codecs settle on other block sizes, update `WIRE_FORMATS`
and the simulator follows.

An encoded buffer of n values costs ``ceil(n * value_bits / 8)`` payload bytes plus
``ceil(n / block) * scale_bits / 8`` bytes of scales (0 for formats without scales).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WireFormat:
    """How one codec lays values on the wire.

    value_bits: bits per encoded value.
    scale_bits: bits per block scale (0: no scales).
    block: values sharing one scale (ignored when scale_bits == 0).
    """

    name: str
    value_bits: int
    scale_bits: int = 0
    block: int = 1
    note: str = ""

    def wire_bytes(self, n_values: float, include_scales: bool = True) -> float:
        """Encoded size in bytes of `n_values` values (scales included by default)."""
        if n_values <= 0:
            return 0.0
        payload = math.ceil(n_values * self.value_bits / 8)
        if not include_scales or self.scale_bits == 0:
            return float(payload)
        return float(payload + math.ceil(n_values / self.block) * self.scale_bits / 8)

    def bits_per_value(self, include_scales: bool = True) -> float:
        """Average bits per value over a long buffer."""
        if not include_scales or self.scale_bits == 0:
            return float(self.value_bits)
        return self.value_bits + self.scale_bits / self.block


WIRE_FORMATS: dict[str, WireFormat] = {
    f.name: f
    for f in (
        WireFormat("fp32", 32, note="IEEE single precision, no scale"),
        WireFormat("bf16", 16, note="bfloat16, no scale"),
        WireFormat("int8", 8, 32, 256, note="blockwise absmax int8, one fp32 scale per 256 values"),
        WireFormat(
            "fp4-e3m0",
            4,
            32,
            128,
            note="1 sign + 3 exponent bits (Streaming DiLoCo), one fp32 scale per 128 values",
        ),
        WireFormat(
            "fp4-e2m1",
            4,
            8,
            32,
            note="OCP MXFP4: E2M1 values, one 8-bit E8M0 scale per 32 values",
        ),
    )
}


def wire_format(name: str) -> WireFormat:
    """Look up a codec by name; ValueError naming the choices if unknown."""
    try:
        return WIRE_FORMATS[name]
    except KeyError:
        raise ValueError(
            f"unknown codec {name!r} (choose from {', '.join(WIRE_FORMATS)})"
        ) from None
