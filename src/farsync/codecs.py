"""Pseudo-gradient exchange codecs: a flat fp32 buffer <-> one flat ``torch.uint8`` payload.

A codec is what travels over the slow link. ``encode`` turns a 1-D float32 tensor into a
single uint8 tensor that holds everything needed to rebuild it (per-block scales
included), and ``encoded_nbytes`` says exactly how many bytes that is, so byte accounting
can be done without encoding anything.

=============  =========================  ====================  ==================
name           value format               scale                 default block size
=============  =========================  ====================  ==================
``fp32``       IEEE float32, raw bytes    none                  -- (lossless)
``bf16``       bfloat16, raw bytes        none                  --
``int8``       int8 in [-127, 127]        fp32, absmax / 127    64
``fp4-e3m0``   sign + 3 exponent bits     fp32, absmax          32
``fp4-e2m1``   OCP MX FP4 (E2M1) values   fp32, absmax / 6      32
=============  =========================  ====================  ==================

The sparse ``topk{D}-{V}`` codecs (send 1 value in D per chunk) are described further down.

Default block sizes (override with ``get_codec(name, block_size=...)``):

* fp4: 32 values per block, as in the OCP Microscaling (MX) formats. A 4-byte fp32 scale
  per 32 values costs 1 bit/value (5 bits/value in all); smaller blocks buy accuracy for
  more scale bytes, larger blocks let one outlier flatten more neighbours to zero.
* int8: 64 values per block: 0.5 bit/value of scale overhead (6.25 %), while keeping an
  outlier's damage to 64 neighbours. 64 also divides the usual parameter-count sizes
  (powers of two, 10^6), so callers rarely have to pad.

Payload layout of the blockwise codecs (all multi-byte values in native byte order, which
is little-endian on every platform PyTorch supports)::

    [ nblocks fp32 scales (4*nblocks bytes) | codes ]

Scales come first so they sit 4-byte aligned at offset 0 of a freshly allocated payload.
int8 codes are one byte per value. fp4 codes are 4 bits, packed two per byte, the
element with the even index in the low nibble: ``byte = code[2i] | code[2i+1] << 4``.
A 4-bit code is sign-magnitude: bit 3 is the sign, bits 0-2 index the magnitude table
(``fp4-e2m1`` therefore matches the OCP E2M1 bit layout S.EE.M).

Magnitude tables, relative to the block scale ``s`` (decoded value = ±table[k] * s):

* ``fp4-e3m0``: k=0 -> 0, k=1..7 -> 2^(k-7) = 1/64, 1/32, ..., 1/2, 1. ``s`` = block absmax,
  so the largest |x| of a block decodes exactly and the block spans a 64x dynamic range.
* ``fp4-e2m1``: 0, 0.5, 1, 1.5, 2, 3, 4, 6. ``s`` = absmax / 6 stored as fp32, not MX's
  one-byte E8M0 power-of-two scale: with a power-of-two scale the block absmax lands
  anywhere in (3, 6] and part of the grid goes unused; an fp32 scale maps it to 6
  exactly, for 3 more scale bytes per block.

Rounding:

* Round-to-nearest (default) is nearest in linear value, decided in the input's domain
  (|x| is compared against the midpoints between neighbouring representable values,
  midpoint * s computed in fp32). Exact ties go to the even code (like IEEE
  round-half-to-even, since the code's lowest bit is the format's lowest significand or
  exponent bit). int8 uses ``torch.round`` (half to even) on x / s. bf16 uses PyTorch's
  float -> bfloat16 conversion, which is round-to-nearest-even.
* Stochastic rounding (``stochastic_rounding=True``) picks one of the two neighbouring
  representable values with probabilities that make the result unbiased: E[decode] = x
  (up to the fp32 rounding of the thresholds). Pass a ``torch.Generator`` on ``x.device``
  to make it reproducible; without one the global generator is used.

Non-finite input (NaN, ±Inf) is propagated, not raised: a block that contains one gets a
NaN scale and decodes to NaN in every position (its codes are unspecified). Raising
would cost a full pass plus, on CUDA, a host sync; callers that must not send NaN check
their pseudo-gradients for non-finite values before encoding. ``fp32`` reproduces NaN/Inf bit-exactly
and ``bf16`` maps them to bfloat16 NaN/Inf.

Blocks whose absmax is below ``qmax * 2^-126`` (the fp32 normal range) store the smallest
normal fp32 as scale; their error bound still holds relative to that stored scale. A
block of zeros decodes to exact zeros.

``encode`` never returns a view of ``x`` and ``decode`` never returns a view of the
payload, so callers may reuse their buffers while a payload is in flight.

Sparse codecs: chunk-wise top-k
===============================

``topk{D}-{V}`` with D in (16, 32, 64, 128) and V in (``int2``, ``fp4``, ``int8``) (12 codecs,
``SPARSE_CODEC_NAMES``), after SparseLoCo (arXiv 2508.15706): the buffer is cut into chunks
of ``block_size`` values, and of each chunk only the k = block_size / D entries of largest
magnitude are sent, each as a position and a quantized value; every other position decodes
to 0. ``codec.sparse`` is True and ``codec.density`` = 1/D (False and 1.0 for the dense
codecs). ``alignment`` = block_size.

Chunk size: a power of two from D (k = 1) to 65536; anything else is a ValueError. Default
4096, SparseLoCo's chunk (64 x 64): k = 64 at D = 64. The chunk's fp32 scale costs 32 / k
bits per kept value (0.5 at D = 64) while the positions cost log2(D) + 2 bits whatever the
chunk size (see below), so larger chunks only save scale bits, at the price of less local
selection (one region of large values takes the budget of all its neighbours) and a slower
top-k; 4096 also divides the usual power-of-two parameter counts.

Selection: the k largest |x| of the chunk, equal magnitudes lowest offset first. Precisely,
entries are ranked by the bit pattern of |x| (the int32 bits with the sign bit cleared),
larger first, then by offset, smaller first: for finite values that is the order of |x|
(-0.0 and +0.0 are the same magnitude); NaN and ±Inf rank above every finite value. The
kept set is therefore unique, and the payload is the same byte for byte whatever the
device, the torch thread count or torch.topk's own tie-breaking (the encoder never relies
on it: rows with a tie at a top-k boundary are redone on unique int64 keys).

Kept values, with one fp32 scale ``s`` per chunk; M = the largest kept |x| (= the chunk's
absmax):

* ``int8``: s = M / 127, code = round-half-to-even(x / s) in [-127, 127], as ``int8``.
* ``fp4``: the ``fp4-e3m0`` grid {0, 2^-6, ..., 2^-1, 1} * s with s = M (the largest kept
  value is exact), the same 4-bit sign-magnitude codes and the same round-to-nearest, ties
  to the even code, as ``fp4-e3m0``.
* ``int2``: symmetric 2-bit integers {-1, 0, +1} * s, with s = the mean |x| of the chunk's
  nonzero kept values (0 if there is none); code = sign(x) if 2|x| > s, else 0 (the nearest
  of {-s, 0, s}; a tie goes to 0). Codes are 2-bit two's complement: 0b00 = 0, 0b01 = +1,
  0b11 = -1; 0b10 (-2) is never written (it would decode to -2 s). s is computed exactly,
  independent of summation order: with M < 2^e (``frexp``), q_i = floor(|x_i| * 2^(40-e)) are
  integers < 2^40 whose exact sum is divided by the count in float64 and scaled back by
  2^(e-40), then rounded to fp32 (nearest even); i.e. the mean to within 2^-39 M before that
  rounding.

  Why this 2-bit scheme: SparseLoCo's (the reference code's ``TopKCompressor`` with 4
  quantization bins over a 6-sigma range) puts the kept values of a whole tensor into 4
  uniform bins of width 1.5 sigma around their mean and decodes each code to the mean of its
  bin, from a per-tensor lookup table. Top-k values cluster at ± a typical magnitude (they are all large), so that is
  in effect sign * centroid magnitude. The scheme here keeps that, per chunk instead of per
  tensor, with one fp32 and no table, symmetric in sign, with exact zeros (a chunk with fewer
  than k nonzero entries keeps zeros, which must stay 0), and with the mean magnitude as the
  L2-optimal level for sign coding. Relative RMS error on the kept values, 4096-value chunks
  at D = 64 (measured offline): Gaussian 0.109 (SparseLoCo-style 0.111), Laplace 0.191
  (0.196), Student-t(3) 0.460 (0.574). An absmax-anchored sign-magnitude grid {a M, M}
  (no zero) matches it on Gaussian chunks only for a tuned a = 2/3 and is 2-3x worse on
  heavy tails (Student-t(3): 1.0-1.5), where one outlier sets M.

Scales of ``int8`` and ``fp4`` chunks are clamped to >= 2^-126 as for the blockwise codecs;
``int2`` needs no clamp (s is never a divisor). Round-to-nearest only: the sparse codecs
refuse ``stochastic_rounding=True`` (ValueError naming the codec). A chunk that contains NaN
or ±Inf gets a NaN scale and all-zero codes (its offsets are those selected: the non-finite
entries first) and decodes to NaN in every position, so receivers' finiteness checks see
it; a chunk of zeros decodes to zeros (its offsets are 0 .. k-1, its codes 0).

Payload layout of the sparse codecs (n = numel / block_size chunks, k kept values per chunk,
w = log2(D), b = 2, 4 or 8 value bits), four sections, each a whole number of bytes (zero
bits pad a section's last byte)::

    [ n fp32 scales (4n bytes) | n*k value codes, b bits each | n*k offset low parts,
      w bits each | n offset bitvectors, 2k bits each ]

The bit-packed sections are LSB-first bitstreams: field i of a section of b-bit fields takes
bits [i*b, (i+1)*b) and bit j of the stream is bit j % 8 of byte j // 8 (so fp4 codes are
packed as in the fp4 codecs, even field in the low nibble, and int8 codes are plain int8
bytes). Fields run chunk by chunk, and within a chunk in ascending offset.

Offsets are Elias-Fano coded, which has a fixed size here because every chunk keeps exactly
k entries: the chunk's kept offsets o_0 < ... < o_(k-1) are split as o_i = h_i * D + l_i with
low part l_i = o_i mod D (w bits, third section) and high part h_i = o_i // D in [0, k); the
chunk's 2k-bit vector has bit h_i + i set for every i and no other (so exactly k bits are
set and bit 2k - 1 is always clear). The decoder reads h_i = p_i - i off the position p_i of
the i-th set bit. That is log2(D) + 2 bits per kept value (8 at D = 64) against
log2(block_size) = 12 for plain offsets. ``decode`` refuses (ValueError) a payload whose
bitvectors break that rule.

So ``encoded_nbytes(numel)`` = 4n + ceil(n k b / 8) + ceil(n k w / 8) + ceil(2 n k / 8), that
is n * (32 + k (b + w + 2)) / 8 when k >= 8 (as at the default chunk). Bits per value at the
default 4096-value chunk, everything included:

===========  ========  ========  ========
codec        int2      fp4       int8
===========  ========  ========  ========
``topk16``   0.5078    0.6328    0.8828
``topk32``   0.2891    0.3516    0.4766
``topk64``   0.1641    0.1953    0.2578
``topk128``  0.0938    0.1094    0.1406
===========  ========  ========  ========

``farsync.codec_names.encoded_nbytes`` computes the same sizes without torch (the simulator's
``WIRE_FORMATS`` use it).
"""

from __future__ import annotations

import abc
import functools
import operator

import torch

from farsync import codec_names as _names
from farsync.codec_names import (
    ALL_CODEC_NAMES,
    CODEC_NAMES,
    DEFAULT_BLOCK_SIZES,
    SCALE_BITS,
    SPARSE_CODEC_NAMES,
)

__all__ = ["ALL_CODEC_NAMES", "CODEC_NAMES", "DEFAULT_BLOCK_SIZES", "SPARSE_CODEC_NAMES", "Codec", "get_codec"]

_SCALE_BYTES = SCALE_BITS // 8  # one fp32 scale per block
_FP32_TINY = torch.finfo(torch.float32).tiny  # smallest normal fp32, 2^-126


def _bytes_as(payload: torch.Tensor, dtype: torch.dtype, *, copy: bool = False) -> torch.Tensor:
    """Reinterpret a contiguous uint8 tensor as ``dtype``; a copy if ``copy``, else a view
    when possible.

    ``Tensor.view(dtype)`` needs the storage offset to be a multiple of the element size;
    a payload sliced out of a larger receive buffer may not be, so copy in that case.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    if copy or payload.storage_offset() % itemsize:
        payload = payload.clone()
    return payload.view(dtype)


# On CPU the blockwise codecs work through the buffer in chunks of about this many values
# per torch thread, so that every temporary stays in the L2 caches and is reused from chunk
# to chunk (allocating, and page-faulting in, buffer-sized temporaries costs more than the
# arithmetic). On other devices one chunk covers the whole buffer.
_CPU_CHUNK_VALUES = 1 << 16
_INT32_MAX = 0x7FFFFFFF


@functools.lru_cache(maxsize=None)
def _const(value: int, dtype: torch.dtype) -> torch.Tensor:
    """A 0-dim CPU tensor of ``dtype``: as the scalar operand of an integer op it skips the
    per-call conversion of a Python int (measurable at thousands of ops per buffer); CPU
    0-dim tensors are accepted as scalars by CUDA ops too."""
    return torch.tensor(value, dtype=dtype)


def _chunks(device: torch.device, nblocks: int, block_size: int) -> list[tuple[int, int]]:
    """-> [(first block, end block)] covering ``range(nblocks)``."""
    if device.type != "cpu":
        return [(0, nblocks)] if nblocks else []
    step = max(1, _CPU_CHUNK_VALUES * torch.get_num_threads() // block_size)
    return [(b, min(b + step, nblocks)) for b in range(0, nblocks, step)]


class Codec(abc.ABC):
    """Turns a 1-D float32 tensor into a 1-D uint8 payload and back.

    Attributes:
        name: one of ``CODEC_NAMES``.
        alignment: ``encode`` needs ``x.numel() % alignment == 0`` (the block size for the
            blockwise codecs, 1 otherwise); callers pad.
        lossless: True only for ``fp32`` (bit-exact round trip).
        stochastic_rounding: whether ``encode`` rounds stochastically (unbiased).
        sparse: True for the ``topk*`` codecs, which send only some of the values (the
            decoded buffer is zero elsewhere).
        density: fraction of the values that are sent: 1.0 for the dense codecs, 1/D for
            ``topk{D}-*``.
    """

    name: str
    alignment: int = 1
    lossless: bool = False
    sparse: bool = False
    density: float = 1.0

    def __init__(self, *, stochastic_rounding: bool = False) -> None:
        self.stochastic_rounding = bool(stochastic_rounding)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Encode ``x`` (1-D float32, numel a multiple of ``alignment``).

        Returns a new 1-D uint8 tensor on ``x.device`` of exactly
        ``encoded_nbytes(x.numel())`` bytes. ``generator`` is only used when stochastic
        rounding is on.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.name}: encode expects a torch.Tensor, got {type(x).__name__}")
        if x.dtype != torch.float32 or x.dim() != 1:
            raise ValueError(
                f"{self.name}: encode expects a 1-D float32 tensor, "
                f"got dtype={x.dtype} shape={tuple(x.shape)}"
            )
        self._check_numel(x.numel())
        return self._encode(x.contiguous(), generator)

    def decode(self, payload: torch.Tensor, numel: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Decode a payload made by ``encode`` of ``numel`` values -> 1-D float32 tensor:
        a new one, or ``out`` (contiguous fp32, ``numel`` values, on the payload's device)
        written in place and returned. A reused ``out`` skips what a fresh CPU output
        costs first: the page faults of memory never touched (on the dev box about as
        long as decoding fp4 into it)."""
        numel = self._check_numel(numel)
        if out is not None and (out.dtype != torch.float32 or out.dim() != 1 or out.numel() != numel
                                or not out.is_contiguous() or out.device != payload.device):
            raise ValueError(f"{self.name}: decode out= must be a contiguous 1-D float32 tensor of {numel} values "
                             f"on {payload.device}, got dtype={out.dtype} shape={tuple(out.shape)} on {out.device}")
        if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
            got = f"dtype={payload.dtype} shape={tuple(payload.shape)}" if isinstance(payload, torch.Tensor) else type(payload).__name__
            raise ValueError(f"{self.name}: decode expects a 1-D uint8 payload, got {got}")
        expected = self.encoded_nbytes(numel)
        if payload.numel() != expected:
            raise ValueError(
                f"{self.name}: payload has {payload.numel()} bytes but numel={numel} "
                f"needs encoded_nbytes={expected}"
            )
        if out is None:
            out = torch.empty(numel, dtype=torch.float32, device=payload.device)
        self._decode(payload.contiguous(), numel, out)
        return out

    @abc.abstractmethod
    def encoded_nbytes(self, numel: int) -> int:
        """Exact size in bytes of the payload for ``numel`` values, scales included."""

    @abc.abstractmethod
    def _encode(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor: ...

    @abc.abstractmethod
    def _decode(self, payload: torch.Tensor, numel: int, out: torch.Tensor) -> None:
        """Write the ``numel`` decoded values into ``out``."""

    def _check_numel(self, numel: int) -> int:
        try:
            n = operator.index(numel)  # accepts numpy ints; rejects floats
        except TypeError:
            n = -1
        if isinstance(numel, bool) or n < 0:
            raise ValueError(f"{self.name}: numel must be a non-negative int, got {numel!r}")
        numel = n
        if numel % self.alignment:
            raise ValueError(
                f"{self.name}: numel={numel} is not a multiple of alignment={self.alignment}; "
                f"pad the buffer to a multiple of codec.alignment"
            )
        return numel

    def __repr__(self) -> str:
        extra = f", block_size={self.alignment}" if isinstance(self, (_BlockCodec, _SparseCodec)) else ""
        return f"{type(self).__name__}(name={self.name!r}{extra}, stochastic_rounding={self.stochastic_rounding})"


class _FP32Codec(Codec):
    """Raw fp32 bytes; 4 bytes/value, bit-exact."""

    name = "fp32"
    lossless = True

    def __init__(self) -> None:
        super().__init__(stochastic_rounding=False)

    def encoded_nbytes(self, numel: int) -> int:
        return 4 * self._check_numel(numel)

    def _encode(self, x, generator):
        # Copy so the payload does not alias x (the caller may overwrite x mid-flight).
        return x.view(torch.uint8).clone()

    def _decode(self, payload, numel, out):
        out.copy_(_bytes_as(payload, torch.float32))  # a copy: never alias the payload


class _BF16Codec(Codec):
    """bfloat16 bytes; 2 bytes/value, relative error <= 2^-8 (RNE) or < 2^-7 (stochastic)."""

    name = "bf16"

    def encoded_nbytes(self, numel: int) -> int:
        return 2 * self._check_numel(numel)

    def _encode(self, x, generator):
        if not self.stochastic_rounding:
            return x.to(torch.bfloat16).view(torch.uint8)  # RNE conversion
        # bf16 is the top 16 bits of fp32. Adding a uniform integer in [0, 2^16) to the
        # fp32 bit pattern and truncating the low 16 bits rounds the magnitude up with
        # probability (dropped bits) / 2^16: unbiased stochastic rounding. The add acts on
        # the magnitude for both signs (sign-magnitude format; the sign bit is never
        # reached by a carry from a finite value).
        noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
        bits = noise.add_(x.view(torch.int32)).bitwise_and_(-65536)  # -65536 == 0xFFFF0000
        y = bits.view(torch.float32).to(torch.bfloat16)  # exact: low 16 bits are zero
        # A NaN's payload bits can carry into Inf/-0; keep NaN a NaN.
        y.masked_fill_(torch.isnan(x), float("nan"))
        return y.view(torch.uint8)

    def _decode(self, payload, numel, out):
        out.copy_(_bytes_as(payload, torch.bfloat16))


class _BlockCodec(Codec):
    """Shared plumbing of the blockwise codecs: scales first, then codes."""

    #: largest magnitude of the normalized value set (absmax maps to qmax * scale)
    qmax: float

    def __init__(self, block_size: int, *, stochastic_rounding: bool = False) -> None:
        super().__init__(stochastic_rounding=stochastic_rounding)
        self.block_size = block_size
        self.alignment = block_size

    def _code_nbytes(self, numel: int) -> int:
        raise NotImplementedError

    def encoded_nbytes(self, numel: int) -> int:
        numel = self._check_numel(numel)
        return _SCALE_BYTES * (numel // self.block_size) + self._code_nbytes(numel)

    def _block_scales(self, xb: torch.Tensor) -> torch.Tensor:
        """Per-block fp32 scale = absmax / qmax, shape (nblocks,).

        Zero (and subnormal-range) blocks get the smallest normal fp32 instead of 0, so
        x / scale never divides by zero and never overflows. Non-finite blocks get NaN so
        that they decode to NaN everywhere.
        """
        # max(amax, -amin) avoids materialising |x|: two cheap reductions instead of an
        # elementwise pass that allocates a full-size temporary.
        absmax = torch.maximum(xb.amax(dim=1), xb.amin(dim=1).neg_())  # NaN propagates
        scale = (absmax / self.qmax).clamp_min_(_FP32_TINY)
        return torch.where(torch.isfinite(absmax), scale, torch.full_like(scale, float("nan")))

    def _new_payload(self, numel: int, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Allocate the payload, write the scales, return (payload, code bytes view)."""
        nblocks = scale.numel()
        payload = torch.empty(self.encoded_nbytes(numel), dtype=torch.uint8, device=scale.device)
        payload[: _SCALE_BYTES * nblocks].view(torch.float32).copy_(scale)
        return payload, payload[_SCALE_BYTES * nblocks :]

    def _split(self, payload: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (scales fp32 (nblocks,), code bytes uint8)."""
        nscale = _SCALE_BYTES * (numel // self.block_size)
        return _bytes_as(payload[:nscale], torch.float32), payload[nscale:]


class _Int8Codec(_BlockCodec):
    """Blockwise absmax int8: code = round(x / s), s = absmax / 127.

    |error| <= s / 2 with round-to-nearest, < s with stochastic rounding.
    """

    name = "int8"
    qmax = 127.0

    def _code_nbytes(self, numel: int) -> int:
        return numel

    def _encode(self, x, generator):
        xb = x.view(-1, self.block_size)
        scale = self._block_scales(xb)
        payload, code_bytes = self._new_payload(x.numel(), scale)
        codes = code_bytes.view(torch.int8).view(xb.shape)
        if self.stochastic_rounding:
            q = xb / scale[:, None]  # in [-127, 127] up to fp32 rounding
            # floor(q + u), u ~ U[0, 1): rounds up with probability frac(q) -> unbiased.
            q.add_(torch.rand(q.shape, device=q.device, generator=generator)).floor_()
            q.clamp_(-self.qmax, self.qmax)  # q = -127 - 1ulp could floor to -128
            codes.copy_(q)
            return payload
        q = None
        for b0, b1 in _chunks(x.device, xb.shape[0], self.block_size):
            xc = xb[b0:b1]
            if q is None or q.shape != xc.shape:
                q = torch.empty_like(xc)
            torch.div(xc, scale[b0:b1, None], out=q)
            # half to even; |q| <= 127 + ulps rounds to <= 127, no clamp needed.
            # copy_ converts float -> int8 straight into the payload.
            codes[b0:b1].copy_(q.round_())
        return payload

    def _decode(self, payload, numel, out):
        scale, code_bytes = self._split(payload, numel)
        codes = code_bytes.view(torch.int8).view(-1, self.block_size)
        out = out.view(codes.shape)
        for b0, b1 in _chunks(payload.device, codes.shape[0], self.block_size):
            out[b0:b1].copy_(codes[b0:b1]).mul_(scale[b0:b1, None])


class _FP4Codec(_BlockCodec):
    """Blockwise 4-bit sign-magnitude codec over an 8-entry magnitude table."""

    #: the 8 magnitudes, increasing, table[0] == 0, table[-1] == qmax
    table: tuple[float, ...]

    def __init__(self, block_size: int, *, stochastic_rounding: bool = False) -> None:
        super().__init__(block_size, stochastic_rounding=stochastic_rounding)
        self.qmax = self.table[-1]
        t = torch.tensor(self.table, dtype=torch.float64)
        self._t = t.float()  # (8,) magnitudes
        self._gaps = (t[1:] - t[:-1]).float()  # (7,) distance to the next magnitude
        self._mids = ((t[1:] + t[:-1]) / 2).float()  # (7,) round-to-nearest thresholds
        # Decoding table: byte -> (value of low nibble, value of high nibble), the two fp32
        # bit patterns stored as one int64, so that one gather from a 1-D table per byte
        # decodes two values (a 1-D gather of 8-byte items is several times faster on CPU
        # than gathering (256, 2) rows).
        signed = torch.cat([t, -t]).float()  # code -> value; codes 8..15 are negative
        byte = torch.arange(256)
        pairs = torch.stack([signed[byte & 15], signed[byte >> 4]], dim=1)  # (256, 2) fp32
        self._pair_lut_cpu = pairs.view(torch.int64).view(-1)  # (256,) bit-pattern pairs
        self._pair_lut: dict[torch.device, torch.Tensor] = {}
        # Round-to-nearest compares |x| with the midpoints as int32 bit patterns; ">=" for
        # odd j (ties to the even code j + 1) is "> bits - 1".
        self._odd = torch.tensor([j % 2 for j in range(len(self.table) - 1)], dtype=torch.int32)

    def _code_nbytes(self, numel: int) -> int:
        return numel // 2

    def _lut(self, device: torch.device) -> torch.Tensor:
        lut = self._pair_lut.get(device)
        if lut is None:
            lut = self._pair_lut[device] = self._pair_lut_cpu.to(device)
        return lut

    def _encode(self, x, generator):
        if not self.stochastic_rounding:
            return self._encode_nearest(x)
        xb = x.view(-1, self.block_size)
        scale = self._block_scales(xb)
        payload, code_bytes = self._new_payload(x.numel(), scale)
        mag = xb.abs()
        codes = torch.zeros(xb.shape, dtype=torch.uint8, device=x.device)
        hit = torch.empty(xb.shape, dtype=torch.bool, device=x.device)
        # Stochastic rounding (the unchanged whole-buffer implementation: its payloads are
        # bit-identical to earlier releases for a given generator; the time goes mostly to
        # torch.rand): threshold j is drawn uniformly in [t_j, t_{j+1}) * s, with one
        # uniform u per element shared by all j. Thresholds below the lower neighbour t_lo
        # are always passed, those above t_hi never, and the one in between is passed with
        # probability (|x| - t_lo) / (t_hi - t_lo): exactly unbiased rounding. The code is
        # the number of thresholds passed (7 compare passes, a loop over the table).
        u = torch.rand(xb.shape, device=x.device, generator=generator)
        thr = torch.empty_like(u)
        base = self._t[:-1].to(x.device)[:, None] * scale  # (7, nblocks)
        step = self._gaps.to(x.device)[:, None] * scale
        for j in range(len(self.table) - 1):
            torch.addcmul(base[j, :, None], u, step[j, :, None], out=thr)
            torch.gt(mag, thr, out=hit)
            codes.add_(hit.view(torch.uint8))
        # Sign bit (bit 3). -0.0 encodes as +0; a negative value rounded to 0 decodes as -0.0.
        torch.lt(xb, 0, out=hit)
        codes.add_(hit.view(torch.uint8).bitwise_left_shift_(3))
        # Pack two codes per byte, even index in the low nibble.
        flat = codes.view(-1)
        torch.bitwise_or(flat[0::2], flat[1::2].bitwise_left_shift(4), out=code_bytes)
        return payload

    def _encode_nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest encode in integer arithmetic on fp32 bit patterns.

        The magnitude code is the number of midpoints ``mid_j * s`` (fp32 products) that
        |x| lies above, ``>=`` for odd j so that exact ties go to the even code. For
        non-negative floats the order of the values is the order of their int32 bit
        patterns, so ``|x| > T`` is ``(bits(T) - bits(|x|)) >> 31 == -1`` (no overflow:
        both are in [0, 2^31)). Same comparisons as a float compare, hence the same codes,
        without bool temporaries (slow on CPU). Works per L2-sized chunk on CPU.
        """
        bs = self.block_size
        xb = x.view(-1, bs)
        scale = self._block_scales(xb)
        payload, code_bytes = self._new_payload(x.numel(), scale)
        dev = x.device
        mids = self._mids.to(dev)[:, None]
        odd = self._odd.to(dev)[:, None]
        nonfinite = ~torch.isfinite(scale)
        c_max, c_inf1 = _const(_INT32_MAX, torch.int32), _const(0x7F800001, torch.int32)
        c8, c28, c31 = (_const(v, torch.int32) for v in (8, 28, 31))
        c28_64 = _const(28, torch.int64)
        xi = xb.view(torch.int32)
        codes_out = code_bytes.view(-1, bs // 2)
        bufs = None
        for b0, b1 in _chunks(dev, xb.shape[0], bs):
            shape = (b1 - b0, bs)
            if bufs is None or bufs[0].shape != shape:
                bufs = (
                    torch.empty(shape, dtype=torch.int32, device=dev),  # bits of |x|
                    torch.empty(shape, dtype=torch.int32, device=dev),  # -magnitude code
                    torch.empty(shape, dtype=torch.int32, device=dev),  # scratch
                    torch.empty(shape, dtype=torch.int32, device=dev),  # sign bit
                    torch.empty((shape[0], bs // 2), dtype=torch.int64, device=dev),
                    torch.empty((len(self.table) - 1, shape[0]), dtype=torch.float32, device=dev),
                    torch.empty((len(self.table) - 1, *shape), dtype=torch.int32, device=dev),
                )
            mag, acc, tmp, sgn, packed, thr, cmp = bufs
            # (7, blocks) int32 thresholds: bits(mid_j * s), the same fp32 products as a
            # float compare uses; ">=" as "> bits - 1" for odd j; non-finite blocks (NaN
            # scale: every float compare is False) get INT32_MAX, never exceeded.
            t = torch.mul(mids, scale[b0:b1], out=thr).view(torch.int32).sub_(odd)
            t.masked_fill_(nonfinite[b0:b1], _INT32_MAX)
            t = t[:, :, None]
            xc = xi[b0:b1]
            torch.bitwise_and(xc, c_max, out=mag)
            # Sign bit (bit 3) iff x < 0 as a float compare, i.e. sign bit set and
            # 0 < bits(|x|) <= bits(inf) (not -0.0, not NaN): the top bit of
            # x & (|x| - (inf + 1)) & -|x|. A negative value rounded to 0 keeps its sign
            # bit (decodes as -0.0).
            torch.sub(mag, c_inf1, out=sgn).bitwise_and_(xc)
            sgn.bitwise_and_(torch.neg(mag, out=tmp)).bitwise_right_shift_(c28).bitwise_and_(c8)
            # all 7 compares in one broadcast op, then one sum: -(magnitude code)
            torch.sub(t, mag, out=cmp).bitwise_right_shift_(c31)  # -[|x| > T_j]
            torch.sum(cmp, dim=0, dtype=torch.int32, out=acc)
            codes = torch.sub(sgn, acc, out=acc).view(-1).view(torch.int64)  # sign | magnitude
            # Pack two codes per byte, even index in the low nibble: viewed as int64, a pair
            # of int32 codes is c0 | c1 << 32 (little-endian); v | v >> 28 has c0 | c1 << 4
            # in its low byte, which the int64 -> uint8 conversion keeps.
            torch.bitwise_right_shift(codes, c28_64, out=packed.view(-1)).bitwise_or_(codes)
            codes_out[b0:b1].copy_(packed)
        return payload

    def _decode(self, payload, numel, out):
        scale, code_bytes = self._split(payload, numel)
        lut = self._lut(payload.device)
        bs = self.block_size
        codes = code_bytes.view(-1, bs // 2)
        out = out.view(codes.shape[0], bs)
        idx = None
        for b0, b1 in _chunks(payload.device, codes.shape[0], bs):
            if idx is None or idx.numel() != (b1 - b0) * (bs // 2):
                idx = torch.empty((b1 - b0) * (bs // 2), dtype=torch.int32, device=payload.device)
            idx.copy_(codes[b0:b1].view(-1))
            # One gather per byte writes two fp32 values (as one int64 bit pattern).
            torch.index_select(lut, 0, idx, out=out[b0:b1].view(torch.int64).view(-1))
            out[b0:b1].mul_(scale[b0:b1, None])


class _FP4E3M0Codec(_FP4Codec):
    """Streaming DiLoCo's FP4: magnitudes {0} + {2^-6, ..., 2^0}, scale = block absmax."""

    name = "fp4-e3m0"
    table = (0.0,) + tuple(2.0 ** (k - 7) for k in range(1, 8))


class _FP4E2M1Codec(_FP4Codec):
    """OCP MX FP4 (E2M1): magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}, scale = absmax / 6."""

    name = "fp4-e2m1"
    table = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


_BLOCK_CODECS: dict[str, type[_BlockCodec]] = {
    "int8": _Int8Codec,
    "fp4-e3m0": _FP4E3M0Codec,
    "fp4-e2m1": _FP4E2M1Codec,
}


# ------------------------------------------------------------------------ sparse codecs

# On CPU the sparse codecs select per piece of about this many values per torch thread.
# Selection takes ~35 small torch ops per piece, so a piece is larger than the blockwise
# codecs' (fewer pieces, less per-op overhead: on the 2-core dev box 2^20 values encoded
# ~7 % faster than 2^19 and ~25 % faster than 2^17); its one full-size temporary (|x|,
# 4 MiB) is read back once, by the max pooling, while still in the L2/L3 caches.
_SPARSE_CPU_CHUNK_VALUES = 1 << 20
_FP4_E3M0_TABLE = _FP4E3M0Codec.table
_INT2_VALUES = (0.0, 1.0, -2.0, -1.0)  # 2-bit two's complement; code 2 (-2) is never sent


@functools.lru_cache(maxsize=None)
def _arange(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=None)
def _lut(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def _pow2_f64(e: torch.Tensor) -> torch.Tensor:
    """2.0 ** e as float64, exactly, for int tensors e in [-1022, 1023] (built from the bit
    pattern: torch.ldexp goes through a float32 power of two on some paths)."""
    return (e.to(torch.int64) + 1023).bitwise_left_shift_(52).view(torch.float64)


def _pack_bits(fields: torch.Tensor, width: int) -> torch.Tensor:
    """Non-negative integer fields (each < 2^width, 1 <= width <= 8) -> LSB-first bitstream:
    field i occupies bits [i * width, (i + 1) * width) of the stream, bit b of the stream is
    bit b % 8 of byte b // 8; the last byte is zero-padded. Returns ceil(n * width / 8) bytes."""
    n = fields.numel()
    dev = fields.device
    if width == 8:
        return fields.reshape(-1).to(torch.uint8)
    if 8 % width == 0:  # 1, 2, 4: whole fields per byte, in uint8
        per = 8 // width
        f = fields.reshape(-1).to(torch.uint8)
        if n % per:
            f = torch.cat([f, f.new_zeros(per - n % per)])
        f = f.view(-1, per)
        out = f[:, 0].clone()
        for j in range(1, per):
            out.bitwise_or_(f[:, j].bitwise_left_shift(j * width))
        return out
    groups = -(-n // 8)  # 8 fields -> `width` bytes through one int64 (8 * width <= 56 bits)
    f = fields.reshape(-1).to(torch.int64)
    if groups * 8 != n:
        f = torch.cat([f, f.new_zeros(groups * 8 - n)])
    words = f.view(groups, 8).bitwise_left_shift(_arange(8, dev) * width).sum(dim=1)
    return words.view(torch.uint8).view(groups, 8)[:, :width].reshape(-1)[: -(-n * width // 8)]


def _unpack_bits(stream: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """Inverse of ``_pack_bits``: ``n`` fields of ``width`` bits -> a (n,) tensor (uint8
    for widths 1, 2, 4 and 8, int64 otherwise)."""
    dev = stream.device
    if width == 8:
        return stream.clone()
    if 8 % width == 0:
        per = 8 // width
        shifts = _arange(per, dev).mul(width).to(torch.uint8)
        fields = stream.unsqueeze(1).bitwise_right_shift(shifts).bitwise_and_((1 << width) - 1)
        return fields.view(-1)[:n]
    groups = -(-n // 8)
    buf = torch.zeros((groups, 8), dtype=torch.uint8, device=dev)
    flat = torch.zeros(groups * width, dtype=torch.uint8, device=dev)
    flat[: stream.numel()] = stream
    buf[:, :width] = flat.view(groups, width)
    words = buf.view(torch.int64)  # (groups, 1)
    return words.bitwise_right_shift(_arange(8, dev) * width).bitwise_and_((1 << width) - 1).view(-1)[:n]


class _SparseCodec(Codec):
    """Chunk-wise top-k: per chunk of ``block_size`` values, the k = block_size / D entries
    of largest magnitude, their positions (Elias-Fano) and their values quantized against
    one fp32 scale per chunk. See the module docstring for the format."""

    sparse = True

    def __init__(self, name: str, block_size: int | None = None) -> None:
        super().__init__(stochastic_rounding=False)
        d, values = _names.sparse_spec(name)
        self.name = name
        self.block_size = _names.check_sparse_block_size(name, block_size)
        self.alignment = self.block_size
        self.keep_every = d
        self.values = values
        self.density = 1.0 / d
        self.k = self.block_size // d  # kept values per chunk
        self.value_bits = _names.VALUE_BITS[name]
        self.low_bits = d.bit_length() - 1  # Elias-Fano low bits per offset: log2(D)
        # Selection goes through groups of g values (g ~ sqrt(D), a power of two < D): the
        # top k groups by their largest entry, then the top k entries of those k groups.
        self._group = 1 << ((d.bit_length() - 1) // 2)

    def encoded_nbytes(self, numel: int) -> int:
        return sum(self._sections(self._check_numel(numel)))

    def _sections(self, numel: int) -> tuple[int, int, int, int]:
        return _names.sparse_sections(self.name, numel, self.block_size)

    # ---------------------------------------------------------------------- selection

    def _select(self, af: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(rows, B) fp32 |x| -> ((rows, k) int64 offsets of each row's top k, ascending, in
        the order "larger |x| bit pattern first, then lower offset"; the number of rows
        that had to be redone by ``_select_keys``).

        Cut the row into G = B / g groups of g values. Every one of the row's top k entries
        lies in one of the k groups with the largest maxima (an entry of any other group is
        beaten by those k maxima). So two top-k's, over the B / g group maxima and over the
        k * g entries of the top groups, find the row's top k; that is ~4x fewer values for
        torch.topk (which costs ~8 ns per value on CPU) than one over B.

        Fast path, on the int32 bit patterns (for |x| >= 0 they order like the values): the
        top k + 1 group maxima (from max pooling), then the top k + 1 of the candidates
        (k + 1 groups: still a superset). Where the k-th and (k+1)-th values differ at both
        stages, the top-k sets are unique, whatever torch.topk does with ties. The other
        rows (a tie at a boundary: repeated magnitudes, zero-padded chunks) and rows with a
        NaN or an Inf (max pooling propagates NaN but not a particular NaN's bits) are
        redone by ``_select_keys`` on unique keys. So the result never depends on torch's
        tie-breaking, the thread count or the device."""
        r, B = af.shape
        k, g = self.k, self._group
        G = B // g
        dev = af.device
        a = af.view(torch.int32)  # |x| >= 0 (NaN too): ordered like its bit pattern
        gmax = torch.nn.functional.max_pool1d(af.view(r, 1, B), g, g).view(r, G).view(torch.int32)
        vals, idx = torch.topk(gmax, k + 1, dim=1, sorted=False)
        lo = vals.argmin(dim=1, keepdim=True)
        tie = (vals == vals.gather(1, lo)).sum(dim=1) > 1
        tie |= vals.amax(dim=1) >= 0x7F800000  # a NaN or an Inf in the row
        rows = (_arange(r, dev) * G).unsqueeze_(1)
        cand = a.view(r * G, g).index_select(0, idx.add(rows).view(-1)).view(r, (k + 1) * g)
        vals, sel = torch.topk(cand, k + 1, dim=1, sorted=False)
        lo = vals.argmin(dim=1, keepdim=True)
        tie |= (vals == vals.gather(1, lo)).sum(dim=1) > 1
        sel = sel.scatter_(1, lo, sel[:, k:].clone()).narrow(1, 0, k)  # drop the (k+1)-th
        # sel indexes cand: group slot * g + position in the group
        off = idx.gather(1, sel.div(g, rounding_mode="floor")).mul_(g).add_(sel.bitwise_and_(g - 1))
        off = off.sort(dim=1).values
        redo = tie.nonzero().view(-1)
        if redo.numel():
            off[redo] = self._select_keys(a.index_select(0, redo))
        return off, redo.numel()

    def _select_keys(self, a: torch.Tensor) -> torch.Tensor:
        """``_select`` from the (rows, B) int32 bit patterns of |x|, on unique int64 keys:
        bits << log2 B | (B - 1 - offset) for entries, max bits << log2 G | (G - 1 - group)
        for groups (ranking groups by their maxima, ties to the lower group, is ranking
        them by their top entries, as groups are contiguous). Exact for any input, ties
        included; slower (int64 temporaries)."""
        r, B = a.shape
        k, g = self.k, self._group
        dev = a.device
        log_b = B.bit_length() - 1
        G = B // g
        log_g = G.bit_length() - 1
        gmax = a.view(r, G, g).amax(dim=2)
        gkey = gmax.to(torch.int64).bitwise_left_shift_(log_g).bitwise_or_(_arange(G, dev).flip(0))
        top = torch.topk(gkey, k, dim=1, sorted=False).values
        first = top.bitwise_not_().bitwise_and_(G - 1).mul_(g)  # first offset of each top group
        off = first.unsqueeze(2).add(_arange(g, dev)).view(r, k * g)
        key = a.gather(1, off).to(torch.int64).bitwise_left_shift_(log_b)
        key.bitwise_or_(off.bitwise_not_().bitwise_and_(B - 1))  # off -> B - 1 - off
        top = torch.topk(key, k, dim=1, sorted=False).values
        return top.bitwise_not_().bitwise_and_(B - 1).sort(dim=1).values

    # --------------------------------------------------------------------- quantization

    def _quantize(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept values (n, k) fp32 -> (scales (n,) fp32, codes (n, k) uint8)."""
        dev = v.device
        absmax = torch.maximum(v.amax(dim=1), v.amin(dim=1).neg_())  # NaN propagates
        nonfinite = ~torch.isfinite(absmax)
        if self.values == "int8":
            scale = (absmax / 127.0).clamp_min_(_FP32_TINY)
            scale.masked_fill_(nonfinite, float("nan"))
            q = (v / scale[:, None]).round_()  # half to even, |q| <= 127
            codes = q.masked_fill_(nonfinite[:, None], 0.0).to(torch.int8).view(torch.uint8)
        elif self.values == "fp4":
            scale = absmax.clamp_min(_FP32_TINY)
            scale.masked_fill_(nonfinite, float("nan"))
            # magnitude code = number of midpoints mid_j * s (fp32 products) below |x|, ">="
            # for odd j (ties to the even code), compared as bit patterns (non-negative
            # floats order like their int32 bits; ">=" is "> bits - 1")
            thr = self._mids(dev)[None, :] * scale[:, None]  # (n, 7)
            thr = thr.view(torch.int32).sub_(self._odd(dev))
            mag = v.view(torch.int32).bitwise_and(_const(_INT32_MAX, torch.int32))
            codes = (mag.unsqueeze(2) > thr.unsqueeze(1)).sum(dim=2, dtype=torch.uint8)
            codes.bitwise_or_((v < 0).view(torch.uint8).bitwise_left_shift(3))
            codes.masked_fill_(nonfinite[:, None], 0)
        else:  # int2: {-1, 0, +1} * s, s = mean magnitude of the nonzero kept values
            a = v.abs()
            m = absmax.masked_fill(nonfinite, 0.0).double()
            e = torch.frexp(m).exponent  # m < 2^e (0 for m == 0)
            # floor(|x| 2^(40-e)) are integers < 2^40 (exact in float64), and any float64 sum
            # of at most 2^12 of them is exact: the mean does not depend on summation order
            fixed = a.double().mul_(_pow2_f64(40 - e)[:, None]).floor_()
            fixed.masked_fill_(nonfinite[:, None], 0.0)
            nnz = (a != 0).sum(dim=1).clamp_min_(1)
            scale = fixed.sum(dim=1).div_(nnz).mul_(_pow2_f64(e - 40)).float()
            scale.masked_fill_(nonfinite, float("nan"))
            # nearest of {0, s}, ties to 0; 2|x| is exact in fp32 (or overflows to inf, which
            # is also right: then 2|x| > fp32 max >= s)
            nonzero = a.mul_(2.0) > scale[:, None]
            codes = (v < 0).view(torch.uint8).bitwise_left_shift(1).bitwise_or_(1).mul_(nonzero)  # 0b01 / 0b11
        return scale, codes

    def _mids(self, device: torch.device) -> torch.Tensor:
        t = torch.tensor(_FP4_E3M0_TABLE, dtype=torch.float64)
        return _lut(tuple(((t[1:] + t[:-1]) / 2).tolist()), device)  # exact in fp32

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def _odd(device: torch.device) -> torch.Tensor:
        return torch.tensor([j % 2 for j in range(7)], dtype=torch.int32, device=device)

    def _value_lut(self, device: torch.device) -> torch.Tensor:
        if self.values == "int8":
            return _lut(tuple(float(c - 256 if c > 127 else c) for c in range(256)), device)
        if self.values == "fp4":
            return _lut(_FP4_E3M0_TABLE + tuple(-t for t in _FP4_E3M0_TABLE), device)
        return _lut(_INT2_VALUES, device)

    # ------------------------------------------------------------------ encode / decode

    def _encode(self, x, generator):
        B, k, w = self.block_size, self.k, self.low_bits
        n = x.numel() // B
        dev = x.device
        xb = x.view(n, B)
        offs = torch.empty((n, k), dtype=torch.int64, device=dev)
        kept = torch.empty((n, k), dtype=torch.float32, device=dev)
        af = None
        keys_only = 0  # pieces left to select with _select_keys alone
        for b0, b1 in _sparse_chunks(dev, n, B):
            if af is None or af.shape[0] != b1 - b0:
                af = torch.empty((b1 - b0, B), dtype=torch.float32, device=dev)
            torch.abs(xb[b0:b1], out=af)  # clears the sign bit, NaN payloads kept
            # Both paths give the same offsets. Data with many repeated magnitudes (bf16-
            # rounded values, say) sends most rows of the fast path to _select_keys anyway,
            # which then costs both (~2x); after such a piece the next 8 go straight there.
            if keys_only:
                keys_only -= 1
                off = self._select_keys(af.view(torch.int32))
            else:
                off, redone = self._select(af)
                if 4 * redone > b1 - b0:
                    keys_only = 8
            offs[b0:b1] = off
            torch.gather(xb[b0:b1], 1, off, out=kept[b0:b1])  # while the piece is in cache
        scale, codes = self._quantize(kept)
        # Elias-Fano: offset o = high * D + low, high in [0, k); the i-th offset of a chunk
        # (ascending) sets bit high + i of the chunk's 2k-bit vector.
        low = offs.bitwise_and(self.keep_every - 1)
        pos = offs.bitwise_right_shift(w).add_(_arange(k, dev))
        hi_bits = torch.zeros((n, 2 * k), dtype=torch.uint8, device=dev)
        hi_bits.scatter_(1, pos, 1)
        sizes = self._sections(x.numel())
        payload = torch.empty(sum(sizes), dtype=torch.uint8, device=dev)
        o1 = sizes[0]
        o2 = o1 + sizes[1]
        o3 = o2 + sizes[2]
        payload[:o1].view(torch.float32).copy_(scale)
        payload[o1:o2] = _pack_bits(codes, self.value_bits)
        payload[o2:o3] = _pack_bits(low, w)
        payload[o3:] = _pack_bits(hi_bits, 1)
        return payload

    def _decode(self, payload, numel, out):
        B, k, w = self.block_size, self.k, self.low_bits
        n = numel // B
        dev = payload.device
        sizes = self._sections(numel)
        o1 = sizes[0]
        o2 = o1 + sizes[1]
        o3 = o2 + sizes[2]
        scale = _bytes_as(payload[:o1], torch.float32)
        codes = _unpack_bits(payload[o1:o2], n * k, self.value_bits).to(torch.int32)
        low = _unpack_bits(payload[o2:o3], n * k, w).view(n, k).to(torch.int64)
        hi_bits = _unpack_bits(payload[o3:], n * 2 * k, 1).view(n, 2 * k)
        if n and (not bool((hi_bits.sum(dim=1, dtype=torch.int32) == k).all()) or bool(hi_bits[:, -1].any())):
            raise ValueError(f"{self.name}: corrupt payload: a chunk's offset bitvector does not have "
                             f"exactly k={k} bits set below bit 2k-1")
        # flat position of the i-th set bit of chunk c is c * 2k + h_i + i
        base = (_arange(n, dev) * (2 * k)).unsqueeze_(1) + _arange(k, dev)
        high = hi_bits.view(-1).nonzero().view(n, k).sub_(base)
        # flat output index c * B + h * D + l
        idx = high.bitwise_left_shift_(w).bitwise_or_(low).add_((_arange(n, dev) * B).unsqueeze_(1))
        vals = self._value_lut(dev).index_select(0, codes).view(n, k).mul_(scale[:, None])
        for b0, b1 in _sparse_chunks(dev, n, B):
            out[b0 * B : b1 * B].zero_()
            out.index_put_((idx[b0:b1].view(-1),), vals[b0:b1].view(-1))
        bad = ~torch.isfinite(scale)
        if n and bool(bad.any()):
            out.view(n, B)[bad] = float("nan")


def _sparse_chunks(device: torch.device, nblocks: int, block_size: int) -> list[tuple[int, int]]:
    if device.type != "cpu":
        return [(0, nblocks)] if nblocks else []
    step = max(1, _SPARSE_CPU_CHUNK_VALUES * torch.get_num_threads() // block_size)
    return [(b, min(b + step, nblocks)) for b in range(0, nblocks, step)]


def get_codec(name: str, *, block_size: int | None = None, stochastic_rounding: bool = False) -> Codec:
    """Build a codec by name (one of ``ALL_CODEC_NAMES``: the dense ``CODEC_NAMES`` and the
    sparse ``SPARSE_CODEC_NAMES``).

    Args:
        name: codec name.
        block_size: values per scale for the blockwise codecs (``int8``, ``fp4-*``) and
            values per chunk for the sparse ones (``topk*``); None ->
            ``DEFAULT_BLOCK_SIZES[name]``. Must be a positive int, even for fp4 (two codes
            per byte), a power of two from D to 65536 for ``topk{D}-*``. Ignored by
            ``fp32`` and ``bf16`` (but still checked).
        stochastic_rounding: unbiased stochastic rounding in ``encode`` (not for ``fp32``,
            which is lossless and ignores it; the sparse codecs refuse it).
    """
    if name in SPARSE_CODEC_NAMES:
        if stochastic_rounding:
            raise ValueError(f"{name}: stochastic_rounding is not supported by the sparse codecs "
                             f"(they round to nearest only); use stochastic_rounding=False")
        return _SparseCodec(name, block_size)
    if name not in CODEC_NAMES:
        if isinstance(name, str) and name.startswith("topk"):
            raise ValueError(f"unknown codec {name!r}; the sparse codecs are topk{{D}}-{{V}} with D in "
                             f"{', '.join(map(str, _names.SPARSE_KEEP_EVERY))} and V in "
                             f"{', '.join(_names.SPARSE_VALUE_FORMATS)}")
        # (the message lists the dense codecs only; it is pinned by tests/unit/test_codecs.py)
        raise ValueError(f"unknown codec {name!r}; choose one of: {', '.join(CODEC_NAMES)}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0):
        raise ValueError(f"block_size must be a positive int, got block_size={block_size!r}")
    if name == "fp32":
        return _FP32Codec()
    if name == "bf16":
        return _BF16Codec(stochastic_rounding=stochastic_rounding)
    if block_size is None:
        block_size = DEFAULT_BLOCK_SIZES[name]
    if name.startswith("fp4") and block_size % 2:
        raise ValueError(
            f"block_size must be even for {name} (two 4-bit codes per byte), got block_size={block_size}"
        )
    return _BLOCK_CODECS[name](block_size, stochastic_rounding=stochastic_rounding)
