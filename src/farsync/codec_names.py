"""The codecs by name and what one value costs on the wire — without torch, so the
simulator (:mod:`farsync.sim.wire`) and the config checks can use them; the codecs
themselves are in :mod:`farsync.codecs`, whose module docstring is the wire spec that the
sizes below follow."""

from __future__ import annotations

import operator

#: The dense codecs (every value is sent).
CODEC_NAMES: tuple[str, ...] = ("fp32", "bf16", "int8", "fp4-e3m0", "fp4-e2m1")

#: Sparse codecs ``topk{D}-{V}`` keep 1 value in D of each chunk: the allowed D ...
SPARSE_KEEP_EVERY: tuple[int, ...] = (16, 32, 64, 128)
#: ... and the formats of the kept values.
SPARSE_VALUE_FORMATS: tuple[str, ...] = ("int2", "fp4", "int8")
#: The 12 sparse codecs, by D then value format.
SPARSE_CODEC_NAMES: tuple[str, ...] = tuple(
    f"topk{d}-{v}" for d in SPARSE_KEEP_EVERY for v in SPARSE_VALUE_FORMATS
)
#: Every codec ``get_codec`` builds.
ALL_CODEC_NAMES: tuple[str, ...] = CODEC_NAMES + SPARSE_CODEC_NAMES

#: Values per chunk of the sparse codecs unless ``block_size`` says otherwise.
DEFAULT_SPARSE_BLOCK_SIZE = 4096
#: Largest chunk a sparse codec accepts (keeps its integer arithmetic exact).
MAX_SPARSE_BLOCK_SIZE = 1 << 16

#: Block size used by ``get_codec(name)`` for the blockwise codecs and chunk size of the
#: sparse codecs (see :mod:`farsync.codecs`); codecs absent here have no scales.
DEFAULT_BLOCK_SIZES: dict[str, int] = {
    "int8": 64, "fp4-e3m0": 32, "fp4-e2m1": 32,
    **{name: DEFAULT_SPARSE_BLOCK_SIZE for name in SPARSE_CODEC_NAMES},
}

_SPARSE_VALUE_BITS = {"int2": 2, "fp4": 4, "int8": 8}

#: Bits of one encoded value (scales not included); for a sparse codec, of one *kept*
#: value (its position costs ``offset_bits(name)`` more).
VALUE_BITS: dict[str, int] = {
    "fp32": 32, "bf16": 16, "int8": 8, "fp4-e3m0": 4, "fp4-e2m1": 4,
    **{f"topk{d}-{v}": _SPARSE_VALUE_BITS[v] for d in SPARSE_KEEP_EVERY for v in SPARSE_VALUE_FORMATS},
}

#: Bits of one block scale (an fp32) for the blockwise codecs and per chunk of the sparse ones.
SCALE_BITS = 32


def is_sparse(name: str) -> bool:
    """Whether ``name`` is one of ``SPARSE_CODEC_NAMES``."""
    return name in SPARSE_CODEC_NAMES


def sparse_spec(name: str) -> tuple[int, str]:
    """``"topk64-int2"`` -> ``(64, "int2")``: keep 1 value in D per chunk, kept-value format."""
    if name not in SPARSE_CODEC_NAMES:
        raise ValueError(f"not a sparse codec: {name!r}; choose one of: {', '.join(SPARSE_CODEC_NAMES)}")
    d, v = name[len("topk"):].split("-", 1)
    return int(d), v


def offset_bits(name: str) -> int:
    """Bits that the position of one kept value costs (Elias-Fano within its chunk):
    log2(D) low bits plus 2 bits of the chunk's 2k-bit high-part bitvector."""
    d, _ = sparse_spec(name)
    return d.bit_length() - 1 + 2


def check_sparse_block_size(name: str, block_size: int | None) -> int:
    """The chunk size a sparse codec uses (``None`` -> the default); ValueError if it is
    not a power of two in [D, MAX_SPARSE_BLOCK_SIZE] (so that k = block_size / D >= 1)."""
    d, _ = sparse_spec(name)
    if block_size is None:
        return DEFAULT_SPARSE_BLOCK_SIZE
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise ValueError(f"{name}: block_size must be an int, got block_size={block_size!r}")
    if block_size < d or block_size > MAX_SPARSE_BLOCK_SIZE or block_size & (block_size - 1):
        raise ValueError(
            f"{name}: block_size must be a power of two from {d} (one kept value per chunk) to "
            f"{MAX_SPARSE_BLOCK_SIZE}, got block_size={block_size!r}"
        )
    return block_size


def sparse_sections(name: str, numel: int, block_size: int | None = None) -> tuple[int, int, int, int]:
    """Byte sizes of the four sections of a sparse payload of ``numel`` values:
    (fp32 chunk scales, value codes, offset low bits, offset high-part bitvectors). Each
    section is a whole number of bytes (its last byte zero-padded)."""
    d, v = sparse_spec(name)
    block = check_sparse_block_size(name, block_size)
    numel = _check_numel(name, numel, block)
    return sparse_section_bytes(d, _SPARSE_VALUE_BITS[v], block, numel // block)


def sparse_section_bytes(keep_every: int, value_bits: int, block_size: int, chunks: int) -> tuple[int, int, int, int]:
    """``sparse_sections`` from the format's numbers: 1 value in ``keep_every`` kept per
    ``block_size``-value chunk, ``value_bits`` per kept value, ``chunks`` chunks."""
    kept = chunks * (block_size // keep_every)
    low = keep_every.bit_length() - 1
    return (
        chunks * SCALE_BITS // 8,
        -(-kept * value_bits // 8),
        -(-kept * low // 8),
        -(-kept * 2 // 8),
    )


def encoded_nbytes(name: str, numel: int, block_size: int | None = None) -> int:
    """Exact payload size in bytes of ``numel`` values for any codec in ``ALL_CODEC_NAMES``
    (what ``get_codec(name, block_size=block_size).encoded_nbytes(numel)`` returns), without
    torch. ``numel`` must be a multiple of the codec's alignment (its block size)."""
    if name in SPARSE_CODEC_NAMES:
        return sum(sparse_sections(name, numel, block_size))
    if name not in CODEC_NAMES:
        raise ValueError(f"unknown codec {name!r}; choose one of: {', '.join(ALL_CODEC_NAMES)}")
    if name == "fp32":
        return 4 * _check_numel(name, numel, 1)
    if name == "bf16":
        return 2 * _check_numel(name, numel, 1)
    block = DEFAULT_BLOCK_SIZES[name] if block_size is None else block_size
    if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
        raise ValueError(f"block_size must be a positive int, got block_size={block!r}")
    if name.startswith("fp4") and block % 2:
        raise ValueError(f"block_size must be even for {name} (two 4-bit codes per byte), got block_size={block}")
    numel = _check_numel(name, numel, block)
    return numel * VALUE_BITS[name] // 8 + SCALE_BITS // 8 * (numel // block)


def _check_numel(name: str, numel: int, alignment: int) -> int:
    try:
        n = operator.index(numel)
    except TypeError:
        n = -1
    if isinstance(numel, bool) or n < 0:
        raise ValueError(f"{name}: numel must be a non-negative int, got {numel!r}")
    if n % alignment:
        raise ValueError(
            f"{name}: numel={n} is not a multiple of alignment={alignment}; "
            f"pad the buffer to a multiple of codec.alignment"
        )
    return n
