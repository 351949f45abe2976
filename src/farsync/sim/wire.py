"""Bytes on the wire per codec, as the simulator counts them.

The table is built from `farsync.codec_names` (value width and default block size of each
codec), so the planner and the training code agree on what a codec costs.

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


def _from_codecs() -> dict[str, WireFormat]:
    """One WireFormat per farsync codec, with the codecs' own default block sizes, so
    the simulator counts what farsync really sends (checked against
    ``Codec.encoded_nbytes`` in the tests)."""
    from farsync.codec_names import CODEC_NAMES, DEFAULT_BLOCK_SIZES, SCALE_BITS, VALUE_BITS

    notes = {
        "fp32": "IEEE single precision, no scale",
        "bf16": "bfloat16, no scale",
        "int8": "blockwise absmax int8, one fp32 scale per block",
        "fp4-e3m0": "1 sign + 3 exponent bits (Streaming DiLoCo), one fp32 scale per block",
        "fp4-e2m1": "OCP FP4 E2M1 values, one fp32 scale per block",
    }
    out = {}
    for name in CODEC_NAMES:
        block = DEFAULT_BLOCK_SIZES.get(name)
        out[name] = WireFormat(name, VALUE_BITS[name], SCALE_BITS if block else 0, block or 1,
                               note=notes[name] + (f" of {block} values" if block else ""))
    return out


WIRE_FORMATS: dict[str, WireFormat] = _from_codecs()


def wire_format(name: str) -> WireFormat:
    """Look up a codec by name; ValueError naming the choices if unknown."""
    try:
        return WIRE_FORMATS[name]
    except KeyError:
        raise ValueError(
            f"unknown codec {name!r} (choose from {', '.join(WIRE_FORMATS)})"
        ) from None
