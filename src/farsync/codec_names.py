"""The codecs by name and what one value costs on the wire — without torch, so the
simulator (:mod:`farsync.sim.wire`) and the config checks can use them; the codecs
themselves are in :mod:`farsync.codecs`."""

from __future__ import annotations

CODEC_NAMES: tuple[str, ...] = ("fp32", "bf16", "int8", "fp4-e3m0", "fp4-e2m1")

#: Block size used by ``get_codec(name)`` for the blockwise codecs (see
#: :mod:`farsync.codecs`); codecs absent here have no scales.
DEFAULT_BLOCK_SIZES: dict[str, int] = {"int8": 64, "fp4-e3m0": 32, "fp4-e2m1": 32}

#: Bits of one encoded value (scales not included).
VALUE_BITS: dict[str, int] = {"fp32": 32, "bf16": 16, "int8": 8, "fp4-e3m0": 4, "fp4-e2m1": 4}

#: Bits of one block scale (an fp32) for the blockwise codecs.
SCALE_BITS = 32
