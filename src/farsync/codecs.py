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
"""

from __future__ import annotations

import abc
import functools
import operator

import torch

from farsync.codec_names import CODEC_NAMES, DEFAULT_BLOCK_SIZES, SCALE_BITS

__all__ = ["CODEC_NAMES", "DEFAULT_BLOCK_SIZES", "Codec", "get_codec"]

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
    """

    name: str
    alignment: int = 1
    lossless: bool = False

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
        extra = f", block_size={self.alignment}" if isinstance(self, _BlockCodec) else ""
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


def get_codec(name: str, *, block_size: int | None = None, stochastic_rounding: bool = False) -> Codec:
    """Build a codec by name (one of ``CODEC_NAMES``).

    Args:
        name: codec name.
        block_size: values per scale for the blockwise codecs (``int8``, ``fp4-*``);
            None -> ``DEFAULT_BLOCK_SIZES[name]``. Must be a positive int, even for fp4
            (two codes per byte). Ignored by ``fp32`` and ``bf16`` (but still checked).
        stochastic_rounding: unbiased stochastic rounding in ``encode`` (not for ``fp32``,
            which is lossless and ignores it).
    """
    if name not in CODEC_NAMES:
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
