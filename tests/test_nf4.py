"""NF4 / FP4 / int4 blockwise quantisation and double quantisation (minillm.quant.nf4)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.quant import nf4
from minillm.quant.nf4 import (
    FP4_CODE,
    INT4_CODE,
    NF4_CODE,
    QuantState4bit,
    create_dynamic_map,
    dequantize_4bit,
    dequantize_4bit_reference,
    dequantize_absmax,
    dequantize_blockwise,
    dequantize_blockwise_reference,
    derive_nf4_code,
    nearest_code_fast,
    nearest_code_reference,
    pack_4bit,
    quantization_error,
    quantize_4bit,
    quantize_4bit_reference,
    quantize_blockwise,
    quantize_blockwise_reference,
    unpack_4bit,
)

BOTH_PATHS = pytest.mark.parametrize(
    "quantize, dequantize",
    [(quantize_4bit, dequantize_4bit), (quantize_4bit_reference, dequantize_4bit_reference)],
    ids=["fast", "reference"],
)


def codes_of(state: QuantState4bit) -> torch.Tensor:
    """Unpack by hand: high nibble first."""
    p = state.packed.long()
    return torch.stack([p >> 4, p & 15], dim=1).flatten()[: state.numel]


# ------------------------------------------------------------------ code tables


def test_nf4_code_is_derived_from_normal_quantiles():
    assert torch.equal(derive_nf4_code(), NF4_CODE)  # bit for bit, as bitsandbytes' table
    assert (NF4_CODE < 0).sum() == 7 and (NF4_CODE == 0).sum() == 1 and (NF4_CODE > 0).sum() == 8
    assert NF4_CODE[0] == -1 and NF4_CODE[-1] == 1 and bool((NF4_CODE[1:] > NF4_CODE[:-1]).all())
    # QLoRA's offset: the mean of 1 - 1/(2*15) and 1 - 1/(2*16)
    assert nf4.NF4_OFFSET == pytest.approx(0.5 * ((1 - 1 / 30) + (1 - 1 / 32)), abs=1e-7)
    # hand check of one value: code[8] = Phi^-1(p_7) / Phi^-1(offset) with p = linspace(offset, 1/2, 9)
    p7 = nf4.NF4_OFFSET + 7 * (0.5 - nf4.NF4_OFFSET) / 8
    quantile = lambda p: math.sqrt(2) * torch.erfinv(torch.tensor(2 * p - 1, dtype=torch.float64)).item()
    assert NF4_CODE[8].item() == pytest.approx(quantile(p7) / quantile(nf4.NF4_OFFSET), rel=1e-6)
    assert NF4_CODE[8].item() == pytest.approx(0.07958029955625534, abs=1e-7)


def test_derive_nf4_code_depends_on_offset_and_rejects_bad_offset():
    other = derive_nf4_code(0.99)
    assert other[0] == -1 and other[-1] == 1 and not torch.allclose(other, NF4_CODE)
    for bad in (0.5, 1.0, 1.2):
        with pytest.raises(ValueError, match="offset"):
            derive_nf4_code(bad)


def test_fp4_code_is_e2m1_in_bitsandbytes_index_order():
    # magnitudes of bit patterns 0..7 are 0, 1/16, 8, 12, 4, 6, 2, 3, divided by 12; bit 3 is the sign
    raw = [0, 1 / 16, 8, 12, 4, 6, 2, 3]
    assert FP4_CODE[:8].tolist() == pytest.approx([v / 12 for v in raw])
    assert torch.equal(FP4_CODE[8:], -FP4_CODE[:8])
    assert sorted(set(FP4_CODE.abs().tolist())) == pytest.approx([0, 1 / 192, 1 / 6, 1 / 4, 1 / 3, 1 / 2, 2 / 3, 1])
    assert INT4_CODE.tolist() == pytest.approx([k / 7 for k in range(-7, 8)])


def test_dynamic_map():
    code = create_dynamic_map()
    assert code.numel() == 256 and bool((code[1:] >= code[:-1]).all())
    assert (code < 0).sum() == 127 and (code == 0).sum() == 1 and (code > 0).sum() == 128
    assert code.max() == 1.0 and code.min().item() == pytest.approx(-0.99296875)
    # smallest magnitude: 10^-6 * midpoint of linspace(0.1, 1, 2) = 5.5e-7
    assert code[code > 0].min().item() == pytest.approx(5.5e-7)
    # exponent 6 has 64 linear fractions: midpoints of linspace(0.1, 1, 65)
    top = code[-65:-1]
    assert top.tolist() == pytest.approx([0.1 + (i + 0.5) * 0.9 / 64 for i in range(64)], abs=1e-7)
    unsigned = create_dynamic_map(signed=False)
    assert unsigned.numel() == 256 and unsigned.min() == 0 and unsigned.max() == 1
    with pytest.raises(ValueError, match="2\\*\\*total_bits"):
        create_dynamic_map(max_exponent_bits=4, total_bits=8)


# ------------------------------------------------------------------ nearest code


def test_nearest_code_reference_hand_cases():
    code = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    x = torch.tensor([-1.0, -0.5, -0.49, 0.25, 0.2500001, 0.74, 0.75, 0.76, 1.0])
    # -0.5 and 0.25 and 0.75 are exact midpoints: they go to the lower code
    assert nearest_code_reference(x, code).tolist() == [0, 0, 1, 1, 2, 2, 2, 3, 3]
    # FP4's unsorted table: indices are bit patterns
    x = torch.tensor([1.0, -1.0, 0.5, -0.1666667, 0.0])
    assert nearest_code_reference(x, FP4_CODE).tolist() == [3, 11, 5, 14, 0]


def edge_points(code: torch.Tensor) -> torch.Tensor:
    """Midpoints, their float neighbours, cell edges, +-1, +-0 and a grid."""
    s = code.sort().values
    mid = (s[1:] + s[:-1]) / 2
    up, down = torch.nextafter(mid, torch.tensor(2.0)), torch.nextafter(mid, torch.tensor(-2.0))
    grid = torch.linspace(-1, 1, 4097)
    points = torch.cat([mid, up, down, grid, code, torch.tensor([-1.0, 1.0, 0.0, -0.0, 1e-30, -1e-30])])
    return points.clamp(-1, 1)


@pytest.mark.parametrize("code", [NF4_CODE, INT4_CODE], ids=["nf4", "int4"])
def test_nearest_code_reference_is_the_argmin_away_from_ties(code):
    torch.manual_seed(7)
    x = torch.rand(10000) * 2 - 1
    s = code.sort().values
    mid = (s[1:] + s[:-1]) / 2
    x = x[(x.unsqueeze(1) - mid).abs().min(dim=1).values > 1e-6]  # rounding of |x - code_j| can flip a near-tie
    assert torch.equal(nearest_code_reference(x, code).long(), (x.unsqueeze(1) - code).abs().argmin(dim=1))


@pytest.mark.parametrize("code", [NF4_CODE, FP4_CODE, INT4_CODE], ids=["nf4", "fp4", "int4"])
def test_fast_nearest_code_equals_reference(code):
    x = torch.cat([edge_points(code), torch.rand(10000) * 2 - 1])
    table = nf4._cell_table(code)
    assert table is not None
    assert torch.equal(nearest_code_fast(x, code, table), nearest_code_reference(x, code))


def test_dynamic_map_falls_back_to_bucketize():
    assert nf4._cell_table(nf4.DYNAMIC_MAP) is None  # its midpoints are 1e-7 apart near zero
    x = torch.rand(1000) * 2 - 1
    assert torch.equal(nearest_code_fast(x, nf4.DYNAMIC_MAP, None), nearest_code_reference(x, nf4.DYNAMIC_MAP))


# ------------------------------------------------------------------ 4-bit quantisation


@BOTH_PATHS
def test_packing_order_hand_made(quantize, dequantize):
    w = torch.tensor([1.0, -1.0, 0.0])  # one partial block, absmax 1
    q = quantize(w, quant_type="nf4", double_quant=False)
    # nf4: 1 -> 15, -1 -> 0, 0 -> 7; odd count padded with the code of 0.0 (7); element 0 in the high nibble
    assert q.packed.tolist() == [0xF0, 0x77]
    assert q.absmax.tolist() == [1.0]
    q = quantize(w, quant_type="fp4", double_quant=False)
    assert q.packed.tolist() == [0x3B, 0x00]  # fp4: 1 -> 3, -1 -> 11 (sign bit), 0 -> 0
    assert dequantize(q).tolist() == [1.0, -1.0, 0.0]


@BOTH_PATHS
def test_quantize_4bit_matches_per_block_definition(quantize, dequantize):
    torch.manual_seed(0)
    w = torch.randn(5, 40)  # 200 values: 3 full blocks of 64 and a partial block of 8
    q = quantize(w, blocksize=64, double_quant=False)
    flat = w.flatten()
    blocks = [flat[i : i + 64] for i in range(0, 200, 64)]
    expected_absmax = torch.stack([b.abs().max() for b in blocks])
    assert q.absmax.shape == (4,) and torch.equal(q.absmax, expected_absmax)
    expected_codes = torch.cat([nearest_code_reference((b / b.abs().max()).clamp(-1, 1), NF4_CODE) for b in blocks])
    assert torch.equal(codes_of(q), expected_codes.long())
    manual = NF4_CODE[codes_of(q)] * expected_absmax.repeat_interleave(64)[:200]
    assert torch.equal(dequantize(q), manual.view(5, 40))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
def test_error_bound_per_block(quant_type, blocksize):
    torch.manual_seed(1)
    w = torch.randn(33, 70) * 0.05
    q = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=False)
    code = q.code.sort().values
    half_gap = (code[1:] - code[:-1]).max().item() / 2
    err = (dequantize_4bit(q) - w).flatten().abs()
    err = torch.nn.functional.pad(err, (0, -err.numel() % blocksize)).view(-1, blocksize)
    bound = q.absmax * half_gap * (1 + 1e-6)
    assert bool((err.max(dim=1).values <= bound).all())
    # the block maximum is represented exactly (NF4 and FP4 both contain +-1)
    assert bool((err.max(dim=1).values < q.absmax).all())


@BOTH_PATHS
def test_partial_last_block_and_odd_count_equal_zero_padding(quantize, dequantize):
    torch.manual_seed(2)
    w = torch.randn(131) * 3
    padded = torch.cat([w, torch.zeros(61)])  # zeros do not change the last block's absmax
    q_w, q_p = quantize(w, double_quant=False), quantize(padded, double_quant=False)
    assert q_w.packed.numel() == 66 and q_w.absmax.numel() == 3
    assert torch.equal(q_w.absmax, q_p.absmax)
    assert torch.equal(codes_of(q_w), codes_of(q_p)[:131])
    assert torch.equal(dequantize(q_w), dequantize(q_p)[:131])
    assert q_w.absmax[2] == w[128:].abs().max()


@BOTH_PATHS
def test_all_zero_block_and_tiny_values(quantize, dequantize):
    w = torch.cat([torch.zeros(64), torch.full((64,), 1e-30), torch.randn(64)])
    q = quantize(w, double_quant=False)
    out = dequantize(q)
    assert torch.equal(out[:64], torch.zeros(64)) and bool(torch.isfinite(out).all())
    assert torch.allclose(out[64:128], w[64:128])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@BOTH_PATHS
def test_other_float_dtypes(dtype, quantize, dequantize):
    torch.manual_seed(3)
    w = torch.randn(8, 64).to(dtype)
    q = quantize(w)
    assert q.dtype == dtype and dequantize(q).dtype == dtype
    assert torch.equal(q.packed, quantize_4bit(w.float()).packed)  # quantised from the fp32 values
    assert dequantize(q, torch.float32).dtype == torch.float32


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300), blocksize=st.sampled_from([1, 2, 16, 64, 256]),
       quant_type=st.sampled_from(["nf4", "fp4"]), seed=st.integers(0, 2**16))
def test_requantising_the_dequantised_weight_is_a_fixed_point(n, blocksize, quant_type, seed):
    torch.manual_seed(seed)
    w = torch.randn(n)
    q = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=False)
    w_hat = dequantize_4bit(q)
    q2 = quantize_4bit(w_hat, blocksize=blocksize, quant_type=quant_type, double_quant=False)
    assert torch.equal(dequantize_4bit(q2), w_hat)


def test_quantize_blockwise_roundtrip_with_custom_code():
    code = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    x = torch.tensor([2.0, -1.0, 0.6, 0.0, 4.0, -1.0])  # blocks of 2: absmax 2, 0.6, 4
    q, absmax = quantize_blockwise(x, code, 2)
    assert absmax.tolist() == pytest.approx([2.0, 0.6, 4.0])
    assert q.tolist() == [4, 1, 4, 2, 4, 1]  # -1/2 -> -0.5; -1/4 is a tie -> the lower code, -0.5
    assert dequantize_blockwise(q, absmax, code, 2).tolist() == pytest.approx([2.0, -1.0, 0.6, 0.0, 4.0, -2.0])


# ------------------------------------------------------------------ double quantisation and storage


def test_double_quant_reconstructs_absmax_within_the_8bit_map_precision():
    torch.manual_seed(4)
    w = torch.randn(300, 257) * torch.rand(300, 1)  # varied block scales, 1205 blocks: 5 DQ blocks (last partial)
    plain, dq = quantize_4bit(w, double_quant=False), quantize_4bit(w, double_quant=True)
    assert torch.equal(dq.packed, plain.packed)  # the 4-bit codes do not depend on double quantisation
    assert dq.absmax is None and dq.absmax_q.dtype == torch.uint8 and dq.absmax_q.numel() == 1205
    assert dq.absmax_scale.numel() == 5 and dq.absmax_offset.numel() == 1
    assert dq.absmax_offset.item() == pytest.approx(plain.absmax.mean().item())
    centred = plain.absmax - dq.absmax_offset
    expected_scale = torch.stack([c.abs().max() for c in centred.split(256)])
    assert torch.equal(dq.absmax_scale, expected_scale)
    dyn = create_dynamic_map()
    max_half_gap = (dyn[1:] - dyn[:-1]).max().item() / 2  # 0.9/64/2 between the largest entries
    err = (dequantize_absmax(dq) - plain.absmax).abs()
    bound = dq.absmax_scale.repeat_interleave(256)[:1205] * max_half_gap * (1 + 1e-5) + 1e-7
    assert bool((err <= bound).all())
    assert err.max() > 0  # it is a lossy code
    rel = ((dequantize_4bit(dq) - dequantize_4bit(plain)).norm() / dequantize_4bit(plain).norm()).item()
    assert rel < 0.01


def test_bits_per_param():
    w = torch.randn(512, 512)
    plain, dq = quantize_4bit(w, double_quant=False), quantize_4bit(w)
    assert plain.nbytes == 512 * 512 // 2 + 4 * (512 * 512 // 64)
    assert plain.bits_per_param == 4.5
    n_blocks = 512 * 512 // 64
    assert dq.nbytes == 512 * 512 // 2 + n_blocks + 4 * (n_blocks // 256) + 4
    assert dq.bits_per_param == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / (512 * 512))
    assert dq.bits_per_param < 4.13
    assert quantize_4bit(w, blocksize=128, double_quant=False).bits_per_param == 4.25


# ------------------------------------------------------------------ readable path == fast path


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor, so that -0.0 and 0.0 (equal as numbers) count as different."""
    if not t.is_floating_point():
        return t
    return t.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_bit_identical(a: torch.Tensor | None, b: torch.Tensor | None) -> None:
    assert (a is None) == (b is None)
    if a is not None:
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def assert_same_state(a: QuantState4bit, b: QuantState4bit) -> None:
    fields = ("packed", "code", "absmax", "absmax_q", "absmax_scale", "absmax_offset", "absmax_code")
    for name in fields:
        assert_bit_identical(getattr(a, name), getattr(b, name))
    assert (a.shape, a.dtype, a.blocksize, a.quant_type) == (b.shape, b.dtype, b.blocksize, b.quant_type)
    assert (a.double_quant, a.dq_blocksize) == (b.double_quant, b.dq_blocksize)


def hard_weights(code: torch.Tensor, n: int, blocksize: int, seed: int) -> torch.Tensor:
    """n values whose blocks cycle through the hard cases for nearest-code search.

    Block kinds: (0) values on midpoints between codes, their float neighbours and the codes, with the
    block's first value +-1 so that x / absmax is exact and a tie stays an exact tie; (1) the same scaled
    by a power of two (still exact); (2) Gaussian; (3) all zeros, half of them -0.0; (4) values that land
    within rounding of a midpoint after scaling by a non-power-of-two absmax.
    """
    g = torch.Generator().manual_seed(seed)
    n_blocks = -(-n // blocksize)
    s = code.sort().values
    mid = (s[1:] + s[:-1]) / 2
    ties = torch.cat([mid, torch.nextafter(mid, torch.tensor(2.0)), torch.nextafter(mid, torch.tensor(-2.0))])
    points = torch.cat([ties.repeat(-(-4000 // len(ties))), edge_points(code)])  # about half exact ties or next to one
    x = points[torch.randint(len(points), (n_blocks, blocksize), generator=g)]  # (n_blocks, blocksize)
    x[:, 0] = torch.where(torch.rand(n_blocks, generator=g) < 0.5, 1.0, -1.0)
    kind = torch.arange(n_blocks) % 5
    x[kind == 1] *= 2.0 ** torch.randint(-30, 30, (int((kind == 1).sum()), 1), generator=g).float()
    x[kind == 2] = torch.randn(int((kind == 2).sum()), blocksize, generator=g)
    x[kind == 3] = torch.tensor([0.0, -0.0]).repeat(blocksize)[:blocksize]
    x[kind == 4] = near_ties_after_rounding(mid, int((kind == 4).sum()), blocksize, g)
    return x.flatten()[:n]


def near_ties_after_rounding(mid: torch.Tensor, rows: int, blocksize: int, g: torch.Generator) -> torch.Tensor:
    """(rows, blocksize) blocks with absmax a in [1, 2) and values within one float step of mid * a.

    x * (1/a) and x / a can round to different sides of a midpoint here, so these blocks notice if one
    path divides where the other multiplies by the reciprocal.
    """
    a = 1 + torch.rand(rows, 1, generator=g)
    near = mid[torch.randint(len(mid), (rows, blocksize), generator=g)] * a
    inf = torch.tensor(math.inf)
    candidates = torch.stack([torch.nextafter(near, -inf), near, torch.nextafter(near, inf)])
    near = candidates.gather(0, torch.randint(3, (1, rows, blocksize), generator=g)).squeeze(0)
    near[:, 0] = a.squeeze(1)
    return near


def test_hard_weights_hit_exact_ties():
    w = hard_weights(NF4_CODE, 4096, 64, seed=0)
    s = NF4_CODE.sort().values
    mid = (s[1:] + s[:-1]) / 2
    scaled = w.view(-1, 64) / w.view(-1, 64).abs().amax(dim=1, keepdim=True)
    assert int(torch.isin(scaled, mid).sum()) > 200  # about one value in 15
    assert bool((w.view(-1, 64)[3::5] == 0).all()) and bool(torch.signbit(w).any())


SIZES = [1, 2, 7, 63, 65, 255, 257, 1000, 3001]  # mostly not multiples of the blocksize


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("blocksize", [1, 2, 16, 64, 128, 256])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_reference_and_fast_4bit_are_bit_identical(quant_type, blocksize, double_quant):
    code = nf4.get_4bit_code(quant_type)
    for i, n in enumerate(SIZES):
        w = hard_weights(code, n, blocksize, seed=i)
        w = w.view(-1, 1) if i % 2 else w  # the state keeps the shape
        fast = quantize_4bit(w, blocksize, quant_type, double_quant)
        reference = quantize_4bit_reference(w, blocksize, quant_type, double_quant)
        assert_same_state(fast, reference)
        assert_bit_identical(dequantize_absmax(fast), nf4.dequantize_absmax_reference(reference))
        assert_bit_identical(dequantize_4bit(fast), dequantize_4bit_reference(reference))
        bf16 = torch.bfloat16
        assert_bit_identical(dequantize_4bit(fast, bf16), dequantize_4bit_reference(reference, bf16))


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_reference_and_fast_agree_across_chunk_boundaries(monkeypatch, double_quant):
    monkeypatch.setattr(nf4, "_CHUNK", 256)  # many chunks, and blocks larger than a chunk, on a small tensor
    torch.manual_seed(8)
    for blocksize in (2, 16, 64, 512):
        for quant_type in ("nf4", "fp4"):
            w = torch.cat([hard_weights(nf4.get_4bit_code(quant_type), 5001, blocksize, seed=blocksize),
                           torch.randn(3000) * 0.02])
            fast = quantize_4bit(w, blocksize, quant_type, double_quant, dq_blocksize=4)
            reference = quantize_4bit_reference(w, blocksize, quant_type, double_quant, dq_blocksize=4)
            assert_same_state(fast, reference)
            assert_bit_identical(dequantize_4bit(fast), dequantize_4bit_reference(reference))


def test_reference_and_fast_agree_on_a_matrix_larger_than_one_chunk():
    torch.manual_seed(9)
    w = torch.randn(1025, 1031) * torch.rand(1025, 1)  # 1.06M values > _CHUNK, odd count, partial last block
    fast, reference = quantize_4bit(w), quantize_4bit_reference(w)
    assert_same_state(fast, reference)
    assert_bit_identical(dequantize_4bit(fast), dequantize_4bit_reference(reference))


@pytest.mark.parametrize("code", [NF4_CODE, FP4_CODE, INT4_CODE, nf4.DYNAMIC_MAP], ids=["nf4", "fp4", "int4", "dyn"])
@pytest.mark.parametrize("blocksize", [1, 4, 64, 256])
def test_reference_and_fast_blockwise_are_bit_identical(code, blocksize):
    for i, n in enumerate(SIZES):
        x = hard_weights(code, n, blocksize, seed=100 + i)
        q_fast, absmax_fast = quantize_blockwise(x, code, blocksize)
        q_ref, absmax_ref = quantize_blockwise_reference(x, code, blocksize)
        assert_bit_identical(q_fast, q_ref)
        assert_bit_identical(absmax_fast, absmax_ref)
        assert q_ref.dtype == torch.uint8 and q_ref.shape == (n,) and absmax_ref.shape == (-(-n // blocksize),)
        assert_bit_identical(dequantize_blockwise(q_fast, absmax_fast, code, blocksize),
                             dequantize_blockwise_reference(q_ref, absmax_ref, code, blocksize))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 2000), blocksize=st.sampled_from([1, 2, 8, 32, 64, 128, 256]),
       quant_type=st.sampled_from(["nf4", "fp4"]), double_quant=st.booleans(),
       log2_scale=st.integers(-40, 40), seed=st.integers(0, 2**16))
def test_reference_and_fast_agree_on_random_weights(n, blocksize, quant_type, double_quant, log2_scale, seed):
    torch.manual_seed(seed)
    w = torch.randn(n) * 2.0**log2_scale
    fast = quantize_4bit(w, blocksize, quant_type, double_quant)
    reference = quantize_4bit_reference(w, blocksize, quant_type, double_quant)
    assert_same_state(fast, reference)
    assert_bit_identical(dequantize_4bit(fast), dequantize_4bit_reference(reference))


def test_pack_and_unpack_are_inverse():
    q = torch.randint(0, 16, (11,), dtype=torch.uint8)
    packed = pack_4bit(q, NF4_CODE)
    assert packed.numel() == 6 and packed[-1] & 15 == 7  # odd count: padded with NF4's index of 0.0
    assert torch.equal(unpack_4bit(packed, 11), q)
    assert pack_4bit(torch.tensor([3], dtype=torch.uint8), FP4_CODE).tolist() == [0x30]  # FP4's 0.0 is index 0


# ------------------------------------------------------------------ data types compared


def test_nf4_has_the_lowest_error_on_gaussian_weights():
    torch.manual_seed(5)
    w = torch.randn(256, 256)
    err = {t: quantization_error(w, t) for t in ("nf4", "fp4", "int4")}
    assert err["nf4"]["mse"] < err["int4"]["mse"] and err["nf4"]["mse"] < err["fp4"]["mse"]
    assert err["nf4"]["mse"] > 0 and err["nf4"]["max_abs"] > 0
    # double quantisation costs almost nothing in accuracy
    assert quantization_error(w, "nf4", double_quant=True)["mse"] == pytest.approx(err["nf4"]["mse"], rel=0.02)


# ------------------------------------------------------------------ bad input


@BOTH_PATHS
def test_bad_input(quantize, dequantize):
    w = torch.randn(4, 64)
    with pytest.raises(TypeError, match="floating"):
        quantize(torch.ones(4, 64, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize([1.0, 2.0])
    with pytest.raises(ValueError, match="non-empty"):
        quantize(torch.empty(0, 3))
    for bad in (0, -64, 48, 3, 64.0, True):
        with pytest.raises(ValueError, match="blocksize must be a positive power of two"):
            quantize(w, blocksize=bad)
    with pytest.raises(ValueError, match="dq_blocksize"):
        quantize(w, dq_blocksize=100)
    with pytest.raises(ValueError, match="quant_type"):
        quantize(w, quant_type="nf8")
    with pytest.raises(ValueError, match="quant_type"):
        quantization_error(w, "int8")
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize(torch.tensor([1.0, float("nan"), 2.0]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize(torch.tensor([1.0, float("inf")]))
    with pytest.raises(TypeError, match="double_quant"):
        quantize(w, double_quant="yes")


@BOTH_PATHS
def test_dequantize_with_mismatched_shape(quantize, dequantize):
    q = quantize(torch.randn(4, 64))
    q.shape = torch.Size((8, 64))
    with pytest.raises(ValueError, match="q.shape"):
        dequantize(q)
    q = quantize(torch.randn(4, 64), double_quant=False)
    q.absmax = q.absmax[:-1]
    with pytest.raises(ValueError, match="absmax"):
        dequantize(q)
    with pytest.raises(TypeError, match="QuantState4bit"):
        dequantize(torch.zeros(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    torch.manual_seed(6)
    w = torch.randn(100, 70)
    q_cpu, q_gpu = quantize_4bit(w), quantize_4bit(w.cuda())
    assert q_gpu.packed.device.type == "cuda"
    assert torch.equal(q_gpu.packed.cpu(), q_cpu.packed)
    assert torch.equal(dequantize_4bit(q_gpu).cpu(), dequantize_4bit(q_cpu))
    reference = quantize_4bit_reference(w.cuda())
    assert reference.packed.device.type == "cuda"
    assert_same_state(reference, q_gpu)
    assert torch.equal(dequantize_4bit_reference(reference), dequantize_4bit(q_gpu))


@BOTH_PATHS
def test_dequantize_with_mismatched_double_quant_scales(quantize, dequantize):
    q = quantize(torch.randn(600, 64))  # 600 blocks -> 3 scales of 256 blocks
    q.absmax_scale = q.absmax_scale[:2]
    with pytest.raises(ValueError, match="absmax_scale"):
        dequantize(q)
