"""Tests for farsync.codecs: sizes, layouts, rounding, error bounds, stochastic rounding."""

from __future__ import annotations

import math

import pytest
import torch

from farsync.codecs import CODEC_NAMES, Codec, get_codec

LOSSY = ("bf16", "int8", "fp4-e3m0", "fp4-e2m1")
BLOCKWISE = ("int8", "fp4-e3m0", "fp4-e2m1")
FP4 = ("fp4-e3m0", "fp4-e2m1")

# Magnitude tables relative to the block scale, and scale = absmax / QMAX (written out
# here independently of the implementation).
FP4_TABLES = {
    "fp4-e3m0": [0.0, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0],
    "fp4-e2m1": [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0],
}
QMAX = {"int8": 127.0, "fp4-e3m0": 1.0, "fp4-e2m1": 6.0}


def _blocky(nblocks: int, block: int, seed: int = 0) -> torch.Tensor:
    """Gaussian values whose per-block magnitude varies over ~6 decades."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(nblocks, block, generator=g)
    x *= torch.logspace(-4, 2, nblocks)[torch.randperm(nblocks, generator=g)][:, None]
    return x.reshape(-1)


def _ref_scale(x: torch.Tensor, name: str, block: int) -> torch.Tensor:
    """Per-element scale (absmax / qmax of its block), float64."""
    absmax = x.double().view(-1, block).abs().amax(dim=1, keepdim=True)
    return (absmax / QMAX[name]).expand(-1, block).reshape(-1)


# ---------------------------------------------------------------- construction / API


def test_names_defaults_and_attributes():
    assert CODEC_NAMES == ("fp32", "bf16", "int8", "fp4-e3m0", "fp4-e2m1")
    expected_alignment = {"fp32": 1, "bf16": 1, "int8": 64, "fp4-e3m0": 32, "fp4-e2m1": 32}
    for name in CODEC_NAMES:
        c = get_codec(name)
        assert isinstance(c, Codec)
        assert c.name == name
        assert c.lossless == (name == "fp32")
        assert c.alignment == expected_alignment[name]
    assert get_codec("int8", block_size=100).alignment == 100
    assert get_codec("int8", block_size=3).alignment == 3  # odd is fine for int8
    assert get_codec("fp4-e2m1", block_size=16).alignment == 16
    assert get_codec("bf16", block_size=16).alignment == 1  # ignored by non-blockwise codecs


def test_unknown_codec_message():
    with pytest.raises(ValueError) as e:
        get_codec("xyz")
    assert str(e.value) == "unknown codec 'xyz'; choose one of: fp32, bf16, int8, fp4-e3m0, fp4-e2m1"


@pytest.mark.parametrize(
    "name, bad",
    [("int8", 0), ("int8", -64), ("int8", 2.5), ("int8", True), ("fp4-e3m0", 0),
     ("fp4-e3m0", 31), ("fp4-e2m1", 33), ("fp4-e2m1", -2), ("fp32", 0)],
)
def test_bad_block_size(name, bad):
    with pytest.raises(ValueError) as e:
        get_codec(name, block_size=bad)
    assert "block_size" in str(e.value) and repr(bad) in str(e.value)


# ---------------------------------------------------------------------------- sizes

# Bytes for 1,000,000 fp32 values, worked out by hand:
# int8: 1 byte/value + 4 bytes per block; fp4: 1/2 byte/value + 4 bytes per block.
SIZES_1M = [
    ("fp32", None, 4_000_000),
    ("bf16", None, 2_000_000),
    ("int8", None, 1_000_000 + 4 * 15_625),  # default block 64 -> 1,062,500
    ("int8", 40, 1_000_000 + 4 * 25_000),  # 1,100,000
    ("int8", 250, 1_000_000 + 4 * 4_000),  # 1,016,000
    ("fp4-e3m0", None, 500_000 + 4 * 31_250),  # default block 32 -> 625,000
    ("fp4-e3m0", 16, 500_000 + 4 * 62_500),  # 750,000
    ("fp4-e2m1", None, 500_000 + 4 * 31_250),  # 625,000
    ("fp4-e2m1", 100, 500_000 + 4 * 10_000),  # 540,000
]


@pytest.mark.parametrize("name, block, nbytes", SIZES_1M)
def test_encoded_size_one_million(name, block, nbytes):
    kw = {} if block is None else {"block_size": block}
    c = get_codec(name, **kw)
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(1))
    assert c.encoded_nbytes(1_000_000) == nbytes
    p = c.encode(x)
    assert p.dtype == torch.uint8 and p.dim() == 1 and p.numel() == nbytes
    y = c.decode(p, 1_000_000)
    assert y.dtype == torch.float32 and y.shape == (1_000_000,)


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("stochastic", [False, True])
def test_len_matches_encoded_nbytes(name, stochastic):
    c = get_codec(name, stochastic_rounding=stochastic)
    for n in (0, 64, 640, 4096):
        p = c.encode(torch.randn(n), torch.Generator().manual_seed(0))
        assert p.numel() == c.encoded_nbytes(n)
        assert c.decode(p, n).shape == (n,)


# ------------------------------------------------------------------------ fp32 / bf16


def test_fp32_bit_exact_including_specials():
    x = torch.randn(1024) * torch.logspace(-40, 38, 1024)
    x[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45, -3e38])
    c = get_codec("fp32")
    y = c.decode(c.encode(x), x.numel())
    assert torch.equal(y.view(torch.int32), x.view(torch.int32))


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_no_aliasing(name):
    c = get_codec(name)
    x = torch.randn(256)
    p = c.encode(x)
    p_before = p.clone()
    x.fill_(123.0)
    assert torch.equal(p, p_before)  # payload does not alias x
    y = c.decode(p, 256)
    y_before = y.clone()
    p.fill_(0)
    assert torch.equal(y, y_before)  # output does not alias the payload


def test_bf16_round_to_nearest_even():
    x = (torch.randn(8192) * torch.logspace(-30, 30, 8192)).float()
    c = get_codec("bf16")
    y = c.decode(c.encode(x), x.numel())
    rel = ((y.double() - x.double()).abs() / x.double().abs()).max().item()
    assert rel <= 2.0**-8
    # Hand-made ties: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 -> even (1.0);
    # 1 + 3*2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6 -> even (1 + 2^-6).
    t = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-20])
    assert c.decode(c.encode(t), 4).tolist() == [1.0, 1 + 2**-6, -1.0, 1 + 2**-7]


def test_bf16_stochastic_neighbours_and_error():
    x = (torch.randn(8192) * torch.logspace(-30, 30, 8192)).float()
    c = get_codec("bf16", stochastic_rounding=True)
    y = c.decode(c.encode(x, torch.Generator().manual_seed(3)), x.numel())
    # Result is bf16(truncate |x|) or the next bf16 away from zero.
    lo = (x.view(torch.int32) & -65536).view(torch.float32)
    hi = ((x.view(torch.int32) & -65536) + 65536).view(torch.float32)
    assert bool(((y == lo) | (y == hi)).all())
    rel = ((y.double() - x.double()).abs() / x.double().abs()).max().item()
    assert rel < 2.0**-7


# ------------------------------------------------------------------------------ int8


@pytest.mark.parametrize("block", [64, 7])
def test_int8_error_bound_and_codes(block):
    x = _blocky(300, block)
    c = get_codec("int8", block_size=block)
    p = c.encode(x)
    nb = x.numel() // block
    scale = _ref_scale(x, "int8", block)
    # Layout: fp32 scales first, then one int8 code per value.
    assert torch.allclose(p[: 4 * nb].view(torch.float32).double(), scale[::block], rtol=1e-6, atol=0)
    codes = p[4 * nb :].view(torch.int8).long()
    assert codes.abs().max().item() == 127  # absmax uses the full range
    y = c.decode(p, x.numel()).double()
    err = (y - x.double()).abs()
    assert bool((err <= scale / 2 * (1 + 1e-5)).all())
    # Round-to-nearest actually happens (error is not just "small"): codes match a
    # float64 reference except where x / scale is within fp32 noise of a .5 tie.
    q = x.double() / scale
    near_tie = ((q - q.floor()) - 0.5).abs() < 1e-4
    assert torch.equal(codes[~near_tie], torch.round(q).long()[~near_tie])


def test_int8_layout_hand_made():
    c = get_codec("int8", block_size=4)
    x = torch.tensor([1.27, -0.6, 0.0, 0.01])
    p = c.encode(x)
    assert p.numel() == 4 + 4
    assert p[:4].view(torch.float32).item() == pytest.approx(0.01, rel=1e-6)
    assert p[4:].tolist() == [127, 256 - 60, 0, 1]


# ------------------------------------------------------------------------------- fp4


def _fp4_bruteforce(x: torch.Tensor, name: str, block: int):
    """Candidates (n, 15) = signed table values * block scale, and distances to x."""
    t = torch.tensor(FP4_TABLES[name], dtype=torch.float64)
    signed = torch.cat([-t.flip(0)[:-1], t])  # -max .. -min, 0, min .. max
    cand = signed[None, :] * _ref_scale(x, name, block)[:, None]
    return cand, (cand - x.double()[:, None]).abs()


@pytest.mark.parametrize("name", FP4)
@pytest.mark.parametrize("block", [32, 8])
def test_fp4_round_to_nearest_bruteforce(name, block):
    x = _blocky(200, block, seed=5)
    c = get_codec(name, block_size=block)
    y = c.decode(c.encode(x), x.numel()).double()
    cand, dist = _fp4_bruteforce(x, name, block)
    # 1. every decoded value is a representable value times the block scale
    on_grid = (cand - y[:, None]).abs() <= 1e-6 * cand.abs().amax(dim=1, keepdim=True)
    assert bool(on_grid.any(dim=1).all())
    # 2. and it is the nearest one (up to fp32 rounding of the midpoint comparison)
    best = dist.min(dim=1).values
    err = (y - x.double()).abs()
    assert bool((err <= best + 1e-6 * cand.abs().amax(dim=1)).all())
    # away from near-ties it is exactly the brute-force argmin
    second = dist.topk(2, dim=1, largest=False).values[:, 1]
    clear = (second - best) > 1e-5 * cand.abs().amax(dim=1)
    assert clear.float().mean() > 0.99
    argmin_val = cand.gather(1, dist.argmin(dim=1, keepdim=True)).squeeze(1)
    assert torch.allclose(y[clear], argmin_val[clear], rtol=1e-6, atol=0)
    # 3. the largest |x| of each block is (almost) exactly representable
    xb, yb = x.double().view(-1, block), y.view(-1, block)
    i = xb.abs().argmax(dim=1, keepdim=True)
    assert torch.allclose(yb.gather(1, i), xb.gather(1, i), rtol=1e-6, atol=0)


def test_fp4_e2m1_ties_to_even_hand_made():
    c = get_codec("fp4-e2m1", block_size=16)
    # block scale = 6 / 6 = 1: x is already in table units.
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0,
                      -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, 0.3])
    y = c.decode(c.encode(x), 16)
    assert y.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0,
                          -0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0, 0.5]


def test_fp4_e3m0_ties_to_even_hand_made():
    c = get_codec("fp4-e3m0", block_size=8)
    # block scale = absmax = 1. Midpoints: 2^-7 (0 | 2^-6), 0.75 * 2^-5 (2^-6 | 2^-5), 0.75.
    x = torch.tensor([1.0, 2**-7, 0.75 * 2**-5, 0.75, 2**-7 * 1.01, 0.74, 0.76, -0.3])
    y = c.decode(c.encode(x), 8)
    assert y.tolist() == [1.0, 0.0, 2**-5, 0.5, 2**-6, 0.5, 1.0, -0.25]


def test_fp4_packing_order_hand_made():
    # e2m1, block of 4, absmax 6 -> scale 1.0 (fp32 bytes 00 00 80 3f, little-endian).
    # codes: 0 -> 0, 6 -> 7, -0.5 -> 8|1 = 9, 1.5 -> 3; even index in the low nibble.
    p = get_codec("fp4-e2m1", block_size=4).encode(torch.tensor([0.0, 6.0, -0.5, 1.5]))
    assert p.tolist() == [0x00, 0x00, 0x80, 0x3F, 0x70, 0x39]
    # e3m0, absmax 1 -> scale 1.0. codes: 1 -> 7, -0.5 -> 8|6 = 14, 2^-6 -> 1, 0 -> 0.
    p = get_codec("fp4-e3m0", block_size=4).encode(torch.tensor([1.0, -0.5, 2**-6, 0.0]))
    assert p.tolist() == [0x00, 0x00, 0x80, 0x3F, 0xE7, 0x01]
    # decode of a hand-made payload: scale 2.0 (00 00 00 40), bytes 0x9F -> (code 15, code 9)
    y = get_codec("fp4-e2m1", block_size=2).decode(torch.tensor([0, 0, 0, 0x40, 0x9F], dtype=torch.uint8), 2)
    assert y.tolist() == [-12.0, -1.0]


# ------------------------------------------------------------------ shared properties


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("stochastic", [False, True])
def test_zero_blocks_roundtrip_to_zero(name, stochastic):
    c = get_codec(name, block_size=32, stochastic_rounding=stochastic)
    x = torch.randn(32 * 6)
    x[32:64] = 0.0
    x[128:160] = 0.0
    y = c.decode(c.encode(x, torch.Generator().manual_seed(0)), x.numel())
    assert not torch.isnan(y).any()
    assert bool((y[32:64] == 0).all()) and bool((y[128:160] == 0).all())
    z = torch.zeros(64)
    pz = c.encode(z, torch.Generator().manual_seed(0))
    assert bool((c.decode(pz, 64) == 0).all())
    # zero blocks get well-defined all-zero codes (no 0/0 anywhere)
    codes = pz[4 * (64 // 32) :] if name in BLOCKWISE else pz
    assert bool((codes == 0).all())


@pytest.mark.parametrize("name", BLOCKWISE)
def test_tiny_and_subnormal_blocks_stay_finite(name):
    c = get_codec(name, block_size=32)
    x = torch.cat([torch.randn(32) * 1e-40, torch.randn(32) * 1e-30, torch.randn(32)])
    y = c.decode(c.encode(x), x.numel())
    assert bool(torch.isfinite(y).all())
    for b in range(3):
        xb, yb = x[32 * b : 32 * (b + 1)], y[32 * b : 32 * (b + 1)]
        assert (yb - xb).abs().max() <= xb.abs().max()


@pytest.mark.parametrize("name", BLOCKWISE)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_poisons_its_block_only(name, bad):
    c = get_codec(name, block_size=16)
    x = torch.randn(64)
    x[21] = bad  # block 1
    y = c.decode(c.encode(x), 64)
    assert bool(torch.isnan(y[16:32]).all())  # the whole block is NaN, not finite garbage
    assert bool(torch.isfinite(y[:16]).all()) and bool(torch.isfinite(y[32:]).all())


@pytest.mark.parametrize("stochastic", [False, True])
def test_bf16_nonfinite_preserved(stochastic):
    c = get_codec("bf16", stochastic_rounding=stochastic)
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0])
    y = c.decode(c.encode(x, torch.Generator().manual_seed(0)), x.numel())
    assert math.isnan(y[0]) and y[1] == float("inf") and y[2] == -float("inf") and y[3] == 1.0
    # NaNs with large payloads must stay NaN under the stochastic bit trick
    nans = torch.tensor([0x7FFFFFFF, -1, 0x7F800001, 0x7FC00000], dtype=torch.int32).view(torch.float32)
    assert bool(torch.isnan(c.decode(c.encode(nans, torch.Generator().manual_seed(0)), 4)).all())


@pytest.mark.parametrize("name", LOSSY)
def test_stochastic_rounding_unbiased_and_deterministic(name):
    block = 32
    base = _blocky(8, block, seed=11)  # 256 values, 8 different block scales
    reps = 2000
    x = base.repeat(reps)  # one encode = 2000 independent roundings of each value
    c = get_codec(name, block_size=block, stochastic_rounding=True)
    p1 = c.encode(x, torch.Generator().manual_seed(1234))
    p2 = c.encode(x, torch.Generator().manual_seed(1234))
    p3 = c.encode(x, torch.Generator().manual_seed(4321))
    assert torch.equal(p1, p2)  # deterministic for a seed
    assert not torch.equal(p1, p3)
    y = c.decode(p1, x.numel()).double().view(reps, -1)
    lo, hi = y.min(dim=0).values, y.max(dim=0).values
    # Every value rounds to one of (at most) two neighbours ...
    assert bool(((y == lo) | (y == hi)).all())
    # ... and the mean over 2000 draws is within 5 standard errors of x (Bernoulli
    # variance <= (hi - lo)^2 / 4), plus fp32 slack.
    bound = 5 * (hi - lo) / 2 / math.sqrt(reps) + 1e-6 * base.double().abs()
    assert bool(((y.mean(dim=0) - base.double()).abs() <= bound).all())
    # The bound has power: round-to-nearest misses it for most values that aren't
    # already representable.
    rtn = get_codec(name, block_size=block)
    yr = rtn.decode(rtn.encode(base), base.numel()).double()
    moved = (hi - lo) > 0
    assert ((yr - base.double()).abs() > bound)[moved].float().mean() > 0.5


@pytest.mark.parametrize("name", LOSSY)
def test_round_to_nearest_ignores_generator(name):
    c = get_codec(name)
    x = torch.randn(640)
    assert torch.equal(c.encode(x), c.encode(x, torch.Generator().manual_seed(9)))


# ---------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("name, n", [("int8", 65), ("fp4-e3m0", 48), ("fp4-e2m1", 31)])
def test_encode_rejects_unaligned_numel(name, n):
    c = get_codec(name)
    with pytest.raises(ValueError) as e:
        c.encode(torch.randn(n))
    msg = str(e.value)
    assert f"numel={n}" in msg and f"alignment={c.alignment}" in msg
    with pytest.raises(ValueError, match=f"numel={n}"):
        c.encoded_nbytes(n)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_encode_rejects_bad_tensors(name):
    c = get_codec(name)
    with pytest.raises(ValueError, match="float32"):
        c.encode(torch.randn(64, dtype=torch.float64))
    with pytest.raises(ValueError, match="1-D"):
        c.encode(torch.randn(2, 64))
    with pytest.raises(TypeError):
        c.encode([1.0] * 64)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_decode_rejects_bad_payloads(name):
    c = get_codec(name)
    p = c.encode(torch.randn(128))
    with pytest.raises(ValueError, match="encoded_nbytes"):
        c.decode(p[:-1], 128)
    with pytest.raises(ValueError, match="uint8"):
        c.decode(p.to(torch.int16), 128)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_decode_from_unaligned_slice_of_receive_buffer(name):
    c = get_codec(name)
    x = torch.randn(128)
    p = c.encode(x)
    buf = torch.zeros(p.numel() + 3, dtype=torch.uint8)
    buf[1 : 1 + p.numel()] = p  # odd byte offset, as in a packed all-gather buffer
    assert torch.equal(c.decode(buf[1 : 1 + p.numel()], 128), c.decode(p, 128))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", CODEC_NAMES)
def test_cuda_matches_cpu(name):
    x = _blocky(64, 64, seed=2)
    c = get_codec(name)
    p_cpu = c.encode(x)
    p_gpu = c.encode(x.cuda())
    assert p_gpu.device.type == "cuda"
    assert torch.equal(p_gpu.cpu(), p_cpu)
    y = c.decode(p_gpu, x.numel())
    assert y.device.type == "cuda" and torch.equal(y.cpu(), c.decode(p_cpu, x.numel()))
    sr = get_codec(name, stochastic_rounding=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    assert sr.encode(x.cuda(), g).numel() == sr.encoded_nbytes(x.numel())


# ------------------------------------------- bit-identity with the reference encoder
#
# The straightforward encoders/decoders the codecs shipped with before the fast paths
# (7 threshold-compare passes for fp4, one whole-buffer pass per op), kept here as the
# oracle: payloads of the fast round-to-nearest encoders must match them bit for bit.

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
_TINY = torch.finfo(torch.float32).tiny


def _oracle_scales(xb: torch.Tensor, qmax: float) -> torch.Tensor:
    absmax = torch.maximum(xb.amax(dim=1), xb.amin(dim=1).neg_())
    scale = (absmax / qmax).clamp_min_(_TINY)
    return torch.where(torch.isfinite(absmax), scale, torch.full_like(scale, float("nan")))


def _oracle_encode(x: torch.Tensor, name: str, block: int) -> torch.Tensor:
    xb = x.view(-1, block)
    if name == "int8":
        scale = _oracle_scales(xb, 127.0)
        codes = (xb / scale[:, None]).round_().to(torch.int8).view(torch.uint8).view(-1)
    else:
        table = FP4_TABLES[name]
        t = torch.tensor(table, dtype=torch.float64)
        mids = ((t[1:] + t[:-1]) / 2).float().to(x.device)
        scale = _oracle_scales(xb, table[-1])
        mag = xb.abs()
        codes = torch.zeros(xb.shape, dtype=torch.uint8, device=x.device)
        for j in range(7):
            m = mids[j] * scale[:, None]
            codes += (mag >= m if j % 2 else mag > m).to(torch.uint8)
        codes += (xb < 0).to(torch.uint8) << 3
        flat = codes.view(-1)
        codes = flat[0::2] | (flat[1::2] << 4)
    return torch.cat([scale.view(torch.uint8), codes])


def _oracle_decode(p: torch.Tensor, name: str, block: int, numel: int) -> torch.Tensor:
    nb = numel // block
    scale = p[: 4 * nb].clone().view(torch.float32)
    if name == "int8":
        q = p[4 * nb :].view(torch.int8).float()
    else:
        t = torch.tensor(FP4_TABLES[name], device=p.device)
        signed = torch.cat([t, -t])
        b = p[4 * nb :].long()
        q = torch.stack([signed[b & 15], signed[b >> 4]], dim=1).view(-1)
    return (q.view(-1, block) * scale[:, None]).view(-1)


def _nasty(name: str, block: int, nblocks: int, seed: int) -> torch.Tensor:
    """Blocks of Gaussians over ~80 decades of scale, exact ties at every midpoint, zeros,
    -0.0, subnormals, fp32-max-sized values, and one block each with NaN, -NaN, +Inf, -Inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(nblocks, block, generator=g)
    x *= torch.logspace(-40, 38, nblocks)[torch.randperm(nblocks, generator=g)][:, None].float()
    if name != "int8":
        # exact ties: block absmax = qmax * s, other entries = midpoints * s (s = 2^k)
        t = torch.tensor(FP4_TABLES[name], dtype=torch.float64)
        mids = ((t[1:] + t[:-1]) / 2).float()
        for b in range(0, nblocks, 7):
            s = 2.0 ** float(torch.randint(-120, 100, (), generator=g))
            sign = torch.where(torch.rand(block, generator=g) < 0.5, -1.0, 1.0)
            idx = torch.randint(0, 7, (block,), generator=g)
            x[b] = mids[idx] * s * sign
            x[b, 0] = t[-1].item() * s
    else:
        for b in range(0, nblocks, 7):  # x / s lands on k + 0.5 exactly
            s = 2.0 ** float(torch.randint(-100, 100, (), generator=g))
            k = torch.randint(-127, 127, (block,), generator=g).float() + 0.5
            x[b] = (k * s).float()  # absmax = 126.5 s or so
    specials = [  # (block, position, value)
        (1, 0, 0.0), (1, 1, -0.0), (1, 2, 1e-45), (4, 1, -0.0), (5, 2, 3.0e38),
        (6, 0, -3.4e38), (6, 1, 3.4e38), (8, 3, float("nan")), (9, 4, -float("nan")),
        (10, 5, float("inf")), (11, 6, -float("inf")), (12, 7, float("nan")),
        (12, 8, -float("inf")), (12, 9, -0.0), (13, 0, -0.0),
    ]
    x[2] = torch.randn(block, generator=g) * 1e-42  # subnormal block
    x[3] = 0.0
    x[13] = 0.0
    for b, i, v in specials:
        x[b, i % block] = v
    return x.view(-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BLOCKWISE)
@pytest.mark.parametrize("block", [None, 8, 2])
@pytest.mark.parametrize("nblocks", [40, 40_000])
def test_payload_bit_identical_to_reference(device, name, block, nblocks):
    c = get_codec(name, block_size=block)
    block = c.block_size
    x = _nasty(name, block, nblocks, seed=nblocks + block).to(device)
    p = c.encode(x)
    ref = _oracle_encode(x, name, block)
    assert p.device == x.device
    assert torch.equal(p, ref)
    y = c.decode(p, x.numel())
    yr = _oracle_decode(ref, name, block, x.numel())
    assert torch.equal(y.view(torch.int32), yr.view(torch.int32))  # bit-identical, NaNs too


@pytest.mark.parametrize("name", BLOCKWISE)
@pytest.mark.parametrize("chunk", [1, 100, 1 << 40])
def test_payload_independent_of_cpu_chunking(name, chunk, monkeypatch):
    """CPU chunk sizes (with a ragged last chunk, or one chunk as on CUDA) give the
    reference payload and decode."""
    import farsync.codecs as codecs_module

    monkeypatch.setattr(codecs_module, "_CPU_CHUNK_VALUES", chunk)
    c = get_codec(name, block_size=8)
    x = _nasty(name, 8, 333, seed=7)
    p = c.encode(x)
    assert torch.equal(p, _oracle_encode(x, name, 8))
    y = c.decode(p, x.numel())
    assert torch.equal(y.view(torch.int32), _oracle_decode(p, name, 8, x.numel()).view(torch.int32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BLOCKWISE)
def test_large_buffer_bit_identical_to_reference(device, name):
    """Large (16 MiB of fp32): many chunks on CPU, outputs larger than any cache."""
    x = torch.randn(1 << 22, generator=torch.Generator().manual_seed(3)).to(device)
    c = get_codec(name)
    p = c.encode(x)
    assert torch.equal(p, _oracle_encode(x, name, c.block_size))
    y = c.decode(p, x.numel())
    assert torch.equal(y, _oracle_decode(p, name, c.block_size, x.numel()))


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_decode_into_a_callers_buffer_equals_a_fresh_decode(name):
    codec = get_codec(name)
    x = torch.randn(4096, generator=torch.Generator().manual_seed(5))
    payload = codec.encode(x)
    out = torch.full((4096,), float("nan"))
    got = codec.decode(payload, 4096, out=out)
    assert got is out and torch.equal(out, codec.decode(payload, 4096))
    with pytest.raises(ValueError, match="decode out= must be a contiguous 1-D float32 tensor of 4096 values"):
        codec.decode(payload, 4096, out=torch.empty(4096, dtype=torch.float64))
    with pytest.raises(ValueError, match="out= must be"):
        codec.decode(payload, 4096, out=torch.empty(8192)[::2])
