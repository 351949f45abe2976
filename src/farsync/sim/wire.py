"""Bytes on the wire per codec, as the simulator counts them.

The table is built from `farsync.codec_names` (value width and default block size of each
codec), so the planner and the training code agree on what a codec costs.

A dense encoded buffer of n values costs ``ceil(n * value_bits / 8)`` payload bytes plus
``ceil(n / block) * scale_bits / 8`` bytes of scales (0 for formats without scales).

A sparse ``topk{D}-*`` buffer is sent chunk by chunk (``block`` values per chunk, k =
block / D kept): ``ceil(n / block)`` chunks (a partial chunk is padded, as farsync pads
buffers to the codec's alignment), each with one fp32 scale and k values of ``value_bits``
plus ``log2(D) + 2`` bits of position — exactly ``Codec.encoded_nbytes`` (see
``farsync.codecs``). ``include_scales=False`` leaves out the chunk scales only: positions are
part of every sparse value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WireFormat:
    """How one codec lays values on the wire.

    value_bits: bits per encoded value (per kept value for a sparse codec).
    scale_bits: bits per block scale (0: no scales).
    block: values sharing one scale (ignored when scale_bits == 0); the chunk size of a
        sparse codec.
    keep_every: D of a sparse ``topk{D}-*`` codec (1 value in D is sent); 1 for the dense ones.
    """

    name: str
    value_bits: int
    scale_bits: int = 0
    block: int = 1
    note: str = ""
    keep_every: int = 1

    def __post_init__(self) -> None:
        d = self.keep_every
        if not isinstance(d, int) or d < 1 or d & (d - 1):
            raise ValueError(f"{self.name}: keep_every must be a power of two >= 1, got {d!r}")
        if d > 1:
            # Any power-of-two chunk of at least D values is costed, also beyond the largest
            # chunk farsync's codec encodes (MAX_SPARSE_BLOCK_SIZE): the simulator's
            # what-ifs (a method's codec_block_size) may ask for one.
            b = self.block
            if isinstance(b, bool) or not isinstance(b, int) or b < d or b & (b - 1):
                raise ValueError(
                    f"{self.name}: block_size must be a power of two of at least {d} (one kept "
                    f"value per chunk), got block_size={b!r}"
                )

    @property
    def sparse(self) -> bool:
        return self.keep_every > 1

    @property
    def density(self) -> float:
        """Fraction of the values that is sent."""
        return 1.0 / self.keep_every

    @property
    def offset_bits(self) -> int:
        """Bits of position per kept value (0 for the dense formats)."""
        return self.keep_every.bit_length() + 1 if self.sparse else 0

    def wire_bytes(self, n_values: float, include_scales: bool = True) -> float:
        """Encoded size in bytes of `n_values` values (scales included by default)."""
        if n_values <= 0:
            return 0.0
        if self.sparse:
            from farsync.codec_names import sparse_section_bytes

            scales, values, low, high = sparse_section_bytes(
                self.keep_every, self.value_bits, self.block, math.ceil(n_values / self.block))
            return float(values + low + high + (scales * self.scale_bits // 32 if include_scales else 0))
        payload = math.ceil(n_values * self.value_bits / 8)
        if not include_scales or self.scale_bits == 0:
            return float(payload)
        return float(payload + math.ceil(n_values / self.block) * self.scale_bits / 8)

    def bits_per_value(self, include_scales: bool = True) -> float:
        """Average bits per value over a long buffer."""
        if self.sparse:
            kept_bits = self.value_bits + self.offset_bits
            if include_scales:
                kept_bits += self.scale_bits * self.keep_every / self.block
            return kept_bits / self.keep_every
        if not include_scales or self.scale_bits == 0:
            return float(self.value_bits)
        return self.value_bits + self.scale_bits / self.block


def _from_codecs() -> dict[str, WireFormat]:
    """One WireFormat per farsync codec, with the codecs' own default block sizes, so
    the simulator counts what farsync really sends (checked against
    ``Codec.encoded_nbytes`` in the tests)."""
    from farsync.codec_names import (
        ALL_CODEC_NAMES, DEFAULT_BLOCK_SIZES, SCALE_BITS, VALUE_BITS, is_sparse, sparse_spec,
    )

    notes = {
        "fp32": "IEEE single precision, no scale",
        "bf16": "bfloat16, no scale",
        "int8": "blockwise absmax int8, one fp32 scale per block",
        "fp4-e3m0": "1 sign + 3 exponent bits (Streaming DiLoCo), one fp32 scale per block",
        "fp4-e2m1": "OCP FP4 E2M1 values, one fp32 scale per block",
    }
    sparse_notes = {
        "int2": "{-1, 0, 1} x the mean kept magnitude",
        "fp4": "fp4-e3m0 grid x the chunk absmax",
        "int8": "int8 x absmax / 127",
    }
    out = {}
    for name in ALL_CODEC_NAMES:
        block = DEFAULT_BLOCK_SIZES.get(name)
        if is_sparse(name):
            d, v = sparse_spec(name)
            out[name] = WireFormat(
                name, VALUE_BITS[name], SCALE_BITS, block, keep_every=d,
                note=f"top 1/{d} of each {block}-value chunk, Elias-Fano positions, values "
                     f"{sparse_notes[v]}, one fp32 scale per chunk",
            )
            continue
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
