"""Tests for the sparse (chunk-wise top-k) codecs of farsync.codecs.

The oracle is an independent, deliberately slow reference written from the format spec in
the farsync.codecs docstring: a Python loop per chunk (selection by sorting (-|x| bits,
offset)), numpy float32 arithmetic for the quantization, Python integers for int2's exact
mean, and numpy.packbits for the bitstreams. The fast encoder must match it byte for byte.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from farsync import codec_names
from farsync.codecs import ALL_CODEC_NAMES, CODEC_NAMES, SPARSE_CODEC_NAMES, Codec, get_codec
from farsync.sim.wire import WIRE_FORMATS

E3M0 = [0.0, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0]
VALUE_BITS = {"int2": 2, "fp4": 4, "int8": 8}
TINY = np.float32(2.0**-126)


def _spec(name: str) -> tuple[int, str]:
    d, v = name[4:].split("-")
    return int(d), v


# ------------------------------------------------------------------- the reference


def _pack(fields: list[int], width: int) -> bytes:
    bits = [(f >> j) & 1 for f in fields for j in range(width)]
    return np.packbits(np.array(bits, dtype=np.uint8), bitorder="little").tobytes() if bits else b""


def _unpack(data: bytes, n: int, width: int) -> list[int]:
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[: n * width]
    return [int(sum(int(bits[i * width + j]) << j for j in range(width))) for i in range(n)]


def _ref_quantize(v: np.ndarray, values: str, nonfinite: bool) -> tuple[np.float32, list[int]]:
    """Kept values (float32, ascending offset) -> (scale, codes) as the docstring says."""
    k = len(v)
    if nonfinite:
        return np.float32("nan"), [0] * k
    mags = [abs(float(t)) for t in v]  # exact (float32 -> Python float)
    m = max(mags)
    if values == "int8":
        s = max(np.float32(np.float32(m) / np.float32(127.0)), TINY)
        return s, [int(np.rint(np.float32(t) / s)) & 0xFF for t in v]
    if values == "fp4":
        s = max(np.float32(m), TINY)
        codes = []
        for t in v:
            a = np.float32(abs(t))
            mag = 0
            for j in range(7):
                thr = np.float32((E3M0[j] + E3M0[j + 1]) / 2) * s  # float32 product
                mag += int(a >= thr) if j % 2 else int(a > thr)
            codes.append(mag | (8 if t < 0 else 0))
        return s, codes
    # int2: s = exact mean of the nonzero kept magnitudes, via integers
    e = math.frexp(m)[1]
    total = sum(math.floor(math.ldexp(a, 40 - e)) for a in mags)
    nnz = sum(1 for a in mags if a != 0)
    s = np.float32(math.ldexp(total / max(nnz, 1), e - 40))
    codes = [(3 if t < 0 else 1) if 2 * a > float(s) else 0 for t, a in zip(v, mags)]
    return s, codes


def ref_encode(x: torch.Tensor, name: str, block: int) -> bytes:
    d, values = _spec(name)
    k, w = block // d, d.bit_length() - 1
    xs = x.numpy()
    mag_bits = (xs.view(np.uint32) & 0x7FFFFFFF).astype(np.int64)
    scales, codes, lows, vectors = [], [], [], []
    for c in range(len(xs) // block):
        mb = mag_bits[c * block : (c + 1) * block].tolist()
        offs = sorted(sorted(range(block), key=lambda i: (-mb[i], i))[:k])
        chunk = xs[c * block : (c + 1) * block]
        s, cs = _ref_quantize(chunk[offs], values, not bool(np.isfinite(chunk).all()))
        scales.append(s)
        codes += cs
        lows += [o % d for o in offs]
        bv = [0] * (2 * k)
        for i, o in enumerate(offs):
            bv[o // d + i] = 1
        vectors += bv
    return (np.array(scales, dtype=np.float32).tobytes() + _pack(codes, VALUE_BITS[values])
            + _pack(lows, w) + _pack(vectors, 1))


def ref_decode(payload: bytes, name: str, block: int, numel: int) -> np.ndarray:
    d, values = _spec(name)
    k, w, n = block // d, d.bit_length() - 1, numel // block
    b = VALUE_BITS[values]
    o1 = 4 * n
    o2 = o1 + -(-n * k * b // 8)
    o3 = o2 + -(-n * k * w // 8)
    scales = np.frombuffer(payload[:o1], dtype=np.float32)
    codes = _unpack(payload[o1:o2], n * k, b)
    lows = _unpack(payload[o2:o3], n * k, w)
    vectors = _unpack(payload[o3:], n * 2 * k, 1)
    if values == "int8":
        table = [float(c - 256 if c > 127 else c) for c in range(256)]
    elif values == "fp4":
        table = E3M0 + [-t for t in E3M0]
    else:
        table = [0.0, 1.0, -2.0, -1.0]
    out = np.zeros(numel, dtype=np.float32)
    for c in range(n):
        ones = [p for p in range(2 * k) if vectors[c * 2 * k + p]]
        assert len(ones) == k
        for i, p in enumerate(ones):
            o = (p - i) * d + lows[c * k + i]
            out[c * block + o] = np.float32(table[codes[c * k + i]]) * scales[c]
        if not np.isfinite(scales[c]):
            out[c * block : (c + 1) * block] = np.nan
    return out


# ------------------------------------------------------------------------ test data


def nasty(block: int, d: int, nchunks: int, seed: int) -> torch.Tensor:
    """Chunks of many kinds: Gaussians over ~70 decades, heavy ties at the top-k boundary,
    constant magnitudes, zeros, fewer nonzeros than k, -0.0, subnormals, fp32-max values,
    exact rounding ties, and NaN / +Inf / -Inf chunks."""
    k = block // d
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(nchunks, block, generator=g)
    x *= torch.logspace(-35, 35, nchunks)[torch.randperm(nchunks, generator=g)][:, None].float()
    for c in range(nchunks):
        kind = c % 12
        row = x[c]
        if kind == 1:  # few distinct magnitudes: ties at the boundary
            row.copy_((torch.randn(block, generator=g) * 2).round() / 4)
        elif kind == 2:
            row.zero_()
        elif kind == 3:  # fewer nonzeros than k (k - 1 or at least 1), the rest +-0.0
            row.zero_()
            row[torch.randperm(block, generator=g)[: max(k - 1, 1)]] = torch.randn(max(k - 1, 1), generator=g)
            row[(row == 0) & (torch.arange(block) % 3 == 0)] = -0.0
        elif kind == 4:  # constant magnitude, random signs
            row.copy_(torch.where(torch.rand(block, generator=g) < 0.5, -1.5, 1.5))
        elif kind == 5:
            row.copy_(torch.randn(block, generator=g) * 1e-41)  # subnormal
        elif kind == 6:
            row.copy_(torch.randn(block, generator=g).clamp(-1, 1) * 3.0e38)
        elif kind == 7:  # int8 ties: s = 2^-3 exactly and x / s = integer + 0.5
            row.copy_((torch.randint(-126, 126, (block,), generator=g).float() + 0.5) * 0.125)
            row[int(torch.randint(0, block, (), generator=g))] = -127 * 0.125
        elif kind == 11:  # fp4 ties: absmax 1 and the midpoints of the grid, largest first
            row.copy_(torch.randn(block, generator=g) * 1e-4)
            row[0] = 1.0
            mids = torch.tensor([(E3M0[j] + E3M0[j + 1]) / 2 for j in reversed(range(7))])
            n = min(7, block - 1)
            sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
            row[1 : 1 + n] = mids[:n] * sign
        elif kind == 8:
            row[int(torch.randint(0, block, (), generator=g))] = float("nan")
        elif kind == 9:
            row[int(torch.randint(0, block, (), generator=g))] = float("inf")
        elif kind == 10:
            row[int(torch.randint(0, block, (), generator=g))] = -float("inf")
            row[int(torch.randint(0, block, (), generator=g))] = float("nan")
    return x.view(-1)


def _bits(t: torch.Tensor | np.ndarray) -> np.ndarray:
    a = t.numpy() if isinstance(t, torch.Tensor) else t
    return a.view(np.int32)


# --------------------------------------------------------------------- names / API


def test_names():
    assert SPARSE_CODEC_NAMES == tuple(f"topk{d}-{v}" for d in (16, 32, 64, 128) for v in ("int2", "fp4", "int8"))
    assert len(SPARSE_CODEC_NAMES) == 12
    assert CODEC_NAMES == ("fp32", "bf16", "int8", "fp4-e3m0", "fp4-e2m1")
    assert ALL_CODEC_NAMES == CODEC_NAMES + SPARSE_CODEC_NAMES
    assert codec_names.ALL_CODEC_NAMES == ALL_CODEC_NAMES
    for name in CODEC_NAMES:
        c = get_codec(name)
        assert c.sparse is False and c.density == 1.0
    for name in SPARSE_CODEC_NAMES:
        d, v = _spec(name)
        c = get_codec(name)
        assert isinstance(c, Codec) and c.name == name and not c.lossless
        assert c.sparse is True and c.density == 1 / d
        assert c.alignment == c.block_size == 4096 == codec_names.DEFAULT_BLOCK_SIZES[name]
        assert codec_names.VALUE_BITS[name] == VALUE_BITS[v]
        assert get_codec(name, block_size=d).alignment == d
        assert "block_size=4096" in repr(c)


def test_codec_names_has_no_torch():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(codec_names))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names} | {n.module.split(".")[0] for n in ast.walk(tree)
                                     if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in imported


@pytest.mark.parametrize("bad", ["topk20-int2", "topk64-int4", "topk64"])
def test_unknown_sparse_name(bad):
    with pytest.raises(ValueError, match="topk.D.-.V. with D in 16, 32, 64, 128 and V in int2, fp4, int8"):
        get_codec(bad)


@pytest.mark.parametrize("name", ["topk16-int2", "topk64-fp4", "topk128-int8"])
@pytest.mark.parametrize("bad", [0, -4096, 2.5, True, "4096", 3, 100, 6144, 1 << 17, "half-d"])
def test_bad_block_size(name, bad):
    d, _ = _spec(name)
    if bad == "half-d":
        bad = d // 2  # k = 0
    with pytest.raises(ValueError) as e:
        get_codec(name, block_size=bad)
    msg = str(e.value)
    assert name in msg and "block_size" in msg and repr(bad) in msg
    with pytest.raises(ValueError, match="block_size"):
        codec_names.encoded_nbytes(name, 4096 * 4, bad)


@pytest.mark.parametrize("name", SPARSE_CODEC_NAMES)
def test_stochastic_rounding_refused(name):
    with pytest.raises(ValueError) as e:
        get_codec(name, stochastic_rounding=True)
    assert name in str(e.value) and "stochastic" in str(e.value)


# ---------------------------------------------------------------------------- sizes

# Bytes per 4096-value chunk at the default, by hand: 4 (scale) + k * (value + log2 D + 2) / 8.
CHUNK_BYTES = {
    "topk16-int2": 4 + 256 * 8 // 8, "topk16-fp4": 4 + 256 * 10 // 8, "topk16-int8": 4 + 256 * 14 // 8,
    "topk32-int2": 4 + 128 * 9 // 8, "topk32-fp4": 4 + 128 * 11 // 8, "topk32-int8": 4 + 128 * 15 // 8,
    "topk64-int2": 4 + 64 * 10 // 8, "topk64-fp4": 4 + 64 * 12 // 8, "topk64-int8": 4 + 64 * 16 // 8,
    "topk128-int2": 4 + 32 * 11 // 8, "topk128-fp4": 4 + 32 * 13 // 8, "topk128-int8": 4 + 32 * 17 // 8,
}


@pytest.mark.parametrize("name", SPARSE_CODEC_NAMES)
def test_exact_sizes(name):
    assert CHUNK_BYTES["topk64-int2"] == 84 and CHUNK_BYTES["topk128-int8"] == 72
    c = get_codec(name)
    fmt = WIRE_FORMATS[name]
    for chunks in (0, 1, 3, 244, 4096):
        n = 4096 * chunks
        assert c.encoded_nbytes(n) == chunks * CHUNK_BYTES[name]
        assert codec_names.encoded_nbytes(name, n) == c.encoded_nbytes(n)
        assert fmt.wire_bytes(n) == c.encoded_nbytes(n)
    assert fmt.bits_per_value() == pytest.approx(8 * CHUNK_BYTES[name] / 4096)
    for chunks in (0, 1, 5):
        p = c.encode(torch.randn(4096 * chunks))
        assert p.dtype == torch.uint8 and p.dim() == 1 and p.numel() == c.encoded_nbytes(4096 * chunks)
    # other chunk sizes, through the simulator's block override too
    d, _ = _spec(name)
    for block in (d, 2 * d, 4 * d, 1024, 65536):
        cb = get_codec(name, block_size=block)
        fb = dataclasses.replace(fmt, block=block)
        for chunks in (1, 3, 7):
            n = block * chunks
            assert fb.wire_bytes(n) == cb.encoded_nbytes(n) == codec_names.encoded_nbytes(name, n, block)
            if block <= 1024:
                assert cb.encode(torch.randn(n)).numel() == cb.encoded_nbytes(n)
    with pytest.raises(ValueError, match="block_size"):
        dataclasses.replace(fmt, block=3 * d)


def test_sizes_of_unaligned_sections_by_hand():
    # topk32-int2, block 64: k = 2, w = 5. Three chunks: 12 bytes of scales, 3*2 codes of
    # 2 bits = 12 bits -> 2 bytes, 6 low parts of 5 bits = 30 bits -> 4 bytes, 3 vectors of
    # 4 bits -> 2 bytes.
    assert codec_names.sparse_sections("topk32-int2", 192, 64) == (12, 2, 4, 2)
    assert get_codec("topk32-int2", block_size=64).encoded_nbytes(192) == 20
    # topk128-int8, block 128: k = 1, w = 7: 4 + 1 + 1 (7 bits) + 1 (2 bits) per chunk alone
    assert codec_names.sparse_sections("topk128-int8", 128, 128) == (4, 1, 1, 1)
    assert codec_names.sparse_sections("topk128-int8", 8 * 128, 128) == (32, 8, 7, 2)
    with pytest.raises(ValueError, match="numel=100 is not a multiple of alignment=4096"):
        get_codec("topk64-int2").encoded_nbytes(100)


def test_dense_sizes_of_the_torch_free_function():
    for name in CODEC_NAMES:
        c = get_codec(name)
        for n in (0, 4096, 999_424):
            assert codec_names.encoded_nbytes(name, n) == c.encoded_nbytes(n) == WIRE_FORMATS[name].wire_bytes(n)
    assert codec_names.encoded_nbytes("int8", 1000, 40) == get_codec("int8", block_size=40).encoded_nbytes(1000)
    with pytest.raises(ValueError, match="unknown codec"):
        codec_names.encoded_nbytes("zstd", 10)


# --------------------------------------------------------------- hand-made payloads


def test_layout_hand_made():
    # topk16-int8, 32-value chunk: k = 2, w = 4. x[3] = 127, x[17] = -64 -> s = 1.0
    x = torch.zeros(32)
    x[3], x[17] = 127.0, -64.0
    x[9] = 5.0
    p = get_codec("topk16-int8", block_size=32).encode(x)
    # scale 1.0 | codes 0x7f, 0xc0 | low parts 3, 1 -> 0x13 | high parts 0, 1 -> bits 0, 2
    assert p.tolist() == [0x00, 0x00, 0x80, 0x3F, 0x7F, 0xC0, 0x13, 0x05]
    # topk16-int2: |kept| 3 and 1 -> s = 2; 2 * 3 > 2 -> -1 (0b11), 2 * 1 == 2 -> 0 (tie)
    x = torch.zeros(32)
    x[5], x[20], x[30] = -3.0, 1.0, 0.5
    c = get_codec("topk16-int2", block_size=32)
    p = c.encode(x)
    assert p.tolist() == [0x00, 0x00, 0x00, 0x40, 0x03, 0x45, 0x05]
    y = c.decode(p, 32)
    assert y[5] == -2.0 and bool((y[torch.arange(32) != 5] == 0).all())
    # topk16-fp4: x[0] = -1 -> code 15, x[31] = 0.5 -> code 6; low parts 0, 15; high 0, 1
    x = torch.zeros(32)
    x[0], x[31], x[7] = -1.0, 0.5, 0.25
    p = get_codec("topk16-fp4", block_size=32).encode(x)
    assert p.tolist() == [0x00, 0x00, 0x80, 0x3F, 0x6F, 0xF0, 0x05]
    # decode of a hand-made payload: scale 2.0, int8 codes 3, -1 at offsets 16 + 2, 16 + 9
    p = torch.tensor([0, 0, 0, 0x40, 3, 0xFF, 0x92, 0b0110], dtype=torch.uint8)
    y = get_codec("topk16-int8", block_size=32).decode(p, 32)
    expect = torch.zeros(32)
    expect[18], expect[25] = 6.0, -2.0
    assert torch.equal(y, expect)


def test_int2_scale_is_the_exact_mean_and_round_to_nearest():
    # 64-value chunk, k = 4 (topk16): kept 3, -2, 2, 1 (mean 2, so 1 is a tie -> 0)
    x = torch.full((64,), 0.25)
    x[[10, 20, 30, 40]] = torch.tensor([3.0, -2.0, 2.0, 1.0])
    c = get_codec("topk16-int2", block_size=64)
    y = c.decode(c.encode(x), 64)
    expect = torch.zeros(64)
    expect[[10, 20, 30]] = torch.tensor([2.0, -2.0, 2.0])
    assert torch.equal(y, expect)
    # mean over nonzero kept values only; zeros kept stay exact zeros
    x = torch.zeros(64)
    x[7], x[50] = -0.75, 0.25  # k = 4, only 2 nonzeros: s = 0.5, 2 * 0.25 == 0.5 -> 0
    p = c.encode(x)
    assert p[:4].view(torch.float32).item() == 0.5
    y = c.decode(p, 64)
    assert y[7] == -0.5 and int((y != 0).sum()) == 1


# ------------------------------------------------------ bit-identity with the reference

ORACLE_CASES = [(name, block) for name in SPARSE_CODEC_NAMES for block in (_spec(name)[0] * 2, 256)] + [
    ("topk16-int2", 16), ("topk128-fp4", 128), ("topk64-int8", 64),  # k = 1
    ("topk64-int2", 4096), ("topk16-fp4", 4096), ("topk128-int8", 4096), ("topk32-int2", 1024),
]


@pytest.mark.parametrize("name, block", ORACLE_CASES)
def test_payload_bit_identical_to_reference(name, block):
    d, _ = _spec(name)
    nchunks = 24 if block <= 256 else 12
    x = nasty(block, d, nchunks, seed=block + d)
    c = get_codec(name, block_size=block)
    p = c.encode(x)
    ref = ref_encode(x, name, block)
    assert bytes(p.numpy().tobytes()) == ref
    y = c.decode(p, x.numel())
    yr = ref_decode(ref, name, block, x.numel())
    assert np.array_equal(_bits(y), _bits(yr))  # bit-identical, NaNs and -0.0 included


@pytest.mark.parametrize("name", ["topk64-int2", "topk16-fp4", "topk32-int8"])
def test_random_ties_match_reference(name):
    # many chunks whose magnitudes come from a set of 5: ties at every boundary
    block = 256
    d, _ = _spec(name)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-5, 6, (60 * block,), generator=g).float() * 0.125
    x[: 5 * block] *= (torch.rand(5 * block, generator=g) < 0.05).float()  # sparse rows
    c = get_codec(name, block_size=block)
    p = c.encode(x)
    assert p.numpy().tobytes() == ref_encode(x, name, block)


@pytest.mark.parametrize("name", ["topk64-int2", "topk16-int8"])
@pytest.mark.parametrize("chunk_values", [1, 5000, 1 << 40])
def test_payload_independent_of_cpu_pieces(name, chunk_values, monkeypatch):
    import farsync.codecs as codecs_module

    monkeypatch.setattr(codecs_module, "_SPARSE_CPU_CHUNK_VALUES", chunk_values)
    d, _ = _spec(name)
    x = nasty(512, d, 37, seed=3)
    c = get_codec(name, block_size=512)
    p = c.encode(x)
    assert p.numpy().tobytes() == ref_encode(x, name, 512)
    assert np.array_equal(_bits(c.decode(p, x.numel())), _bits(ref_decode(p.numpy().tobytes(), name, 512, x.numel())))


@pytest.mark.parametrize("name", ["topk64-int2", "topk16-fp4"])
def test_both_selection_paths_agree(name, monkeypatch):
    """The fast selection and the unique-key one give the same offsets; the encoder
    switches to the latter for a while after a tie-heavy piece (bf16-rounded data), which
    must not change the payload."""
    import farsync.codecs as codecs_module

    d, _ = _spec(name)
    block = 512
    g = torch.Generator().manual_seed(6)
    x = torch.randn(40 * block, generator=g)
    x[: 8 * block] = x[: 8 * block].bfloat16().float() * 1e-3  # ties at the top of most rows
    x[20 * block : 22 * block] = x[20 * block : 22 * block].bfloat16().float()
    c = get_codec(name, block_size=block)
    a = x.abs().view(-1, block)
    fast, redone = c._select(a.clone())
    assert redone > 0
    assert torch.equal(fast, c._select_keys(a.view(torch.int32).clone()))
    monkeypatch.setattr(codecs_module, "_SPARSE_CPU_CHUNK_VALUES", 2 * block)  # 2-row pieces
    assert c.encode(x).numpy().tobytes() == ref_encode(x, name, block)


def test_deterministic_across_thread_counts():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1 << 20, generator=g)
    x[: 1 << 18] = (x[: 1 << 18] * 3).round()  # ties
    x[1 << 19 : (1 << 19) + 4096] = 0.0
    before = torch.get_num_threads()
    try:
        for name in ("topk64-int2", "topk16-fp4", "topk128-int8"):
            c = get_codec(name)
            torch.set_num_threads(1)
            p1 = c.encode(x)
            y1 = c.decode(p1, x.numel())
            torch.set_num_threads(2)
            p2 = c.encode(x)
            y2 = c.decode(p2, x.numel())
            assert torch.equal(p1, p2)
            assert torch.equal(y1.view(torch.int32), y2.view(torch.int32))
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------- value properties


def _blocky(block: int, nchunks: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(nchunks, block, generator=g)
    x *= torch.logspace(-8, 8, nchunks)[torch.randperm(nchunks, generator=g)][:, None]
    x[::3] = torch.distributions.StudentT(3.0).sample((len(range(0, nchunks, 3)), block)) * 1e-3
    return x.reshape(-1)


@pytest.mark.parametrize("name", SPARSE_CODEC_NAMES)
def test_selection_and_error_bounds(name):
    d, values = _spec(name)
    block = 1024
    k = block // d
    x = _blocky(block, 40, seed=d)
    c = get_codec(name, block_size=block)
    y = c.decode(c.encode(x), x.numel())
    xb, yb = x.double().view(-1, block), y.double().view(-1, block)
    mag = xb.abs()
    top = mag.topk(k, dim=1)
    kept = torch.zeros_like(mag, dtype=torch.bool).scatter_(1, top.indices, True)
    # 1. nothing outside the top k (no ties in this data): exact zeros there
    assert bool((yb[~kept] == 0).all())
    assert bool((mag[kept].view(-1, k).amin(1) > mag.masked_fill(kept, -1).amax(1)).all())
    v = xb[kept].view(-1, k)
    dv = yb[kept].view(-1, k)
    m = v.abs().amax(dim=1, keepdim=True)
    err = (dv - v).abs()
    if values == "int8":
        s = m / 127
        assert bool((err <= s / 2 * (1 + 1e-5)).all())
    elif values == "fp4":
        grid = torch.tensor(E3M0, dtype=torch.float64)
        cand = torch.cat([grid, -grid])[None, None, :] * m[:, :, None]
        best = (cand - v[:, :, None]).abs().amin(dim=2)
        assert bool((err <= best + 1e-6 * m).all())
        assert bool(((dv.abs() - m).abs() <= 1e-6 * m).any(dim=1).all())  # absmax is exact
    else:
        s = v.abs().mean(dim=1, keepdim=True)  # nonzero kept magnitudes (none are 0 here)
        assert bool(((dv.abs() - s).abs() <= 1e-6 * s).logical_or(dv == 0).all())  # on {0, +-s}
        nearest = torch.minimum(v.abs(), (v.abs() - s).abs())
        assert bool((err <= nearest + 1e-6 * s).all())
        assert bool((torch.sign(dv) * torch.sign(v) >= 0).all())
    # the relative error stays within what the value format allows
    rel = ((yb - xb)[kept].norm() / xb[kept].norm()).item()
    assert rel < {"int8": 0.01, "fp4": 0.3, "int2": 0.6}[values]


@pytest.mark.parametrize("name", SPARSE_CODEC_NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_poisons_its_chunk_only(name, bad):
    d, _ = _spec(name)
    block = 4 * d
    x = torch.randn(4 * block)
    x[block + 5] = bad  # chunk 1
    c = get_codec(name, block_size=block)
    p = c.encode(x)
    y = c.decode(p, x.numel())
    assert bool(torch.isnan(y[block : 2 * block]).all())
    assert bool(torch.isfinite(y[:block]).all()) and bool(torch.isfinite(y[2 * block :]).all())
    assert math.isnan(p[4:8].view(torch.float32).item())


@pytest.mark.parametrize("name", SPARSE_CODEC_NAMES)
def test_zero_chunks_and_few_nonzeros(name):
    d, _ = _spec(name)
    block = 8 * d  # k = 8
    c = get_codec(name, block_size=block)
    z = torch.zeros(3 * block)
    z[block + 1] = -0.0
    pz = c.encode(z)
    assert bool((c.decode(pz, z.numel()) == 0).all())
    scales, codes, _, _ = codec_names.sparse_sections(name, z.numel(), block)
    assert bool((pz[scales : scales + codes] == 0).all())  # all-zero codes
    # a chunk with 3 nonzeros (< k = 8): they come back quantized, every zero stays 0
    x = torch.zeros(block)
    x[[2, 40, block - 1]] = torch.tensor([0.5, -2.0, 1.0])
    y = c.decode(c.encode(x), block)
    assert set(torch.nonzero(y).view(-1).tolist()) <= {2, 40, block - 1}
    assert y[40] < 0


@pytest.mark.parametrize("name", SPARSE_CODEC_NAMES)
def test_no_aliasing_out_and_unaligned_slices(name):
    c = get_codec(name, block_size=256)
    x = torch.randn(1024)
    p = c.encode(x)
    before = p.clone()
    x.fill_(7.0)
    assert torch.equal(p, before)
    y = c.decode(p, 1024)
    y_before = y.clone()
    p.fill_(0)
    assert torch.equal(y, y_before)
    # out= writes in place, over garbage
    out = torch.full((1024,), float("nan"))
    assert c.decode(before, 1024, out=out) is out and torch.equal(out, y_before)
    with pytest.raises(ValueError, match="out= must be"):
        c.decode(before, 1024, out=torch.empty(2048)[::2])
    # from an odd offset of a receive buffer
    buf = torch.zeros(before.numel() + 3, dtype=torch.uint8)
    buf[1 : 1 + before.numel()] = before
    assert torch.equal(c.decode(buf[1 : 1 + before.numel()], 1024), y_before)


def test_bad_payloads_refused():
    c = get_codec("topk64-int2", block_size=256)  # k = 4: 8-bit vectors
    x = torch.randn(512)
    p = c.encode(x)
    with pytest.raises(ValueError, match="encoded_nbytes"):
        c.decode(p[:-1], 512)
    bad = p.clone()
    bad[-1] ^= 0x01  # one bit more or less in chunk 1's offset vector
    with pytest.raises(ValueError, match="corrupt payload"):
        c.decode(bad, 512)
    bad = p.clone()
    bad[-1] = 0xF0  # 4 bits set, but bit 2k - 1 too
    with pytest.raises(ValueError, match="corrupt payload"):
        c.decode(bad, 512)
    with pytest.raises(ValueError, match="numel=100 is not a multiple of alignment=256"):
        c.encode(torch.randn(100))
    with pytest.raises(ValueError, match="float32"):
        c.encode(torch.randn(256, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", SPARSE_CODEC_NAMES)
def test_cuda_matches_cpu(name):
    d, _ = _spec(name)
    x = nasty(1024, d, 36, seed=9)
    c = get_codec(name, block_size=1024)
    p_cpu = c.encode(x)
    p_gpu = c.encode(x.cuda())
    assert p_gpu.device.type == "cuda" and torch.equal(p_gpu.cpu(), p_cpu)
    y = c.decode(p_gpu, x.numel())
    assert y.device.type == "cuda"
    assert torch.equal(y.cpu().view(torch.int32), c.decode(p_cpu, x.numel()).view(torch.int32))
