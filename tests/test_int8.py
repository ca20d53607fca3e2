"""Absmax / zero-point int8 and LLM.int8() (minillm.quant.int8)."""

import copy

import pytest
import torch
from torch import nn

from minillm.model import GPT, GPTConfig
from minillm.quant.int8 import (
    Int8Linear,
    dequantize_absmax,
    dequantize_zeropoint,
    inject_outlier,
    int8_error,
    int8_matmul,
    int8_matmul_vectorwise,
    int8_roundtrip,
    linear_weight_bytes,
    llm_int8_matmul,
    llm_int8_matmul_quantized,
    outlier_columns,
    quantize_absmax,
    quantize_linear_int8,
    quantize_model_int8,
    quantize_zeropoint,
    vectorwise_dequant,
    vectorwise_error_bound,
    vectorwise_quant,
)

GRANULARITY = pytest.mark.parametrize("granularity", ["tensor", "row", "block"])


def per_value_scale(scale: torch.Tensor, x: torch.Tensor, granularity: str, blocksize: int = 64) -> torch.Tensor:
    """Each value's scale, written out from the definitions (not from the module's helpers)."""
    if granularity == "tensor":
        return scale.expand(x.shape)
    if granularity == "row":
        return scale.view(-1, *([1] * (x.dim() - 1))).expand(x.shape)
    return scale.repeat_interleave(blocksize)[: x.numel()].view(x.shape)


def varied_rows(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(12, 100, generator=g) * torch.logspace(-2, 1, 12).unsqueeze(1)  # rows of varied scale


# ------------------------------------------------------------------ hand-computed cases


def test_absmax_hand_case():
    q, scale = quantize_absmax(torch.tensor([1.0, -2.0, 0.5]))
    # scale = 2 / 127; 1 * 127 / 2 = 63.5 (a tie, to even: 64), -2 -> -127, 0.5 * 63.5 = 31.75 -> 32
    assert q.dtype == torch.int8 and q.tolist() == [64, -127, 32]
    assert scale.shape == () and scale.item() == pytest.approx(2 / 127)
    assert dequantize_absmax(q, scale).tolist() == pytest.approx([128 / 127, -2.0, 64 / 127])


def test_absmax_rounds_half_to_even():
    # absmax 127: scale 1, so x / scale = x exactly; 62.5 -> 62 (even), -0.5 -> 0, 1.5 -> 2, 2.5 -> 2
    q, scale = quantize_absmax(torch.tensor([127.0, 62.5, -0.5, 1.5, 2.5, -126.5]))
    assert scale.item() == 1.0
    assert q.tolist() == [127, 62, 0, 2, 2, -126]


def test_zeropoint_hand_cases():
    # lo = -128, hi = 127: scale 1, zero point round(128) - 128 = 0; ties to even
    q, scale, zp = quantize_zeropoint(torch.tensor([-128.0, 127.0, 0.0, 3.5, -2.5]))
    assert scale.item() == 1.0 and zp.item() == 0 and zp.dtype == torch.int8
    assert q.tolist() == [-128, 127, 0, 4, -2]
    # all positive: the range is widened to [0, 255], so z = -128 and 0 is exact
    q, scale, zp = quantize_zeropoint(torch.tensor([255.0, 10.5, 0.0, 100.0]))
    assert scale.item() == 1.0 and zp.item() == -128
    assert q.tolist() == [127, -128 + 10, -128, -28]
    assert dequantize_zeropoint(q, scale, zp).tolist() == [255.0, 10.0, 0.0, 100.0]
    # the brief's example: lo = -2, hi = 1, scale = 3/255, z = round(170) - 128 = 42
    q, scale, zp = quantize_zeropoint(torch.tensor([1.0, -2.0, 0.5]))
    assert scale.item() == pytest.approx(3 / 255) and zp.item() == 42
    assert q[:2].tolist() == [127, -128]  # max and min at the ends of the int8 range
    assert q[2].item() in (84, 85)  # 0.5 / scale = 42.5 up to float rounding of 3/255


# ------------------------------------------------------------------ error bounds and scales


@GRANULARITY
def test_absmax_roundtrip_within_half_a_step(granularity):
    x = varied_rows(1)
    q, scale = quantize_absmax(x, granularity, blocksize=64)
    s = per_value_scale(scale, x, granularity)
    err = (x - dequantize_absmax(q, scale, granularity, 64)).abs()
    assert bool((err <= s / 2 * (1 + 1e-5) + 1e-7).all())
    assert int(q.abs().max()) == 127 and q.dtype == torch.int8 and q.shape == x.shape
    if granularity == "row":  # one scale per output row: its absmax / 127
        assert scale.shape == (12,) and torch.allclose(scale, x.abs().amax(dim=1) / 127)
    if granularity == "block":  # 1200 values: 18 full blocks of 64 and one of 48
        blocks = torch.nn.functional.pad(x.flatten(), (0, 16)).view(-1, 64)
        assert scale.shape == (19,) and torch.allclose(scale, blocks.abs().amax(dim=1) / 127)


@GRANULARITY
def test_zeropoint_roundtrip_within_half_a_step(granularity):
    x = varied_rows(2) + 0.3 * varied_rows(3).abs()  # asymmetric ranges
    q, scale, zp = quantize_zeropoint(x, granularity)
    s = per_value_scale(scale, x, granularity)
    x_hat = dequantize_zeropoint(q, scale, zp, granularity)
    assert bool(((x - x_hat).abs() <= s / 2 * (1 + 1e-5) + 1e-7).all())
    assert int(q.min()) == -128 and int(q.max()) == 127  # the whole range is used
    # 0 is exactly representable: an exact 0 in x is coded as its group's zero point and comes back as 0
    x[:, 5] = 0.0
    q, scale, zp = quantize_zeropoint(x, granularity)
    z = per_value_scale(zp.float(), x, granularity)
    assert torch.equal(q[:, 5].float(), z[:, 5])
    assert torch.equal(dequantize_zeropoint(q, scale, zp, granularity)[:, 5], torch.zeros(12))


@pytest.mark.parametrize("method", ["absmax", "zeropoint"])
def test_finer_granularity_is_more_accurate(method):
    x = varied_rows(4)
    err = {g: int8_error(x, method, g, blocksize=32)["rel_mse"] for g in ("tensor", "row", "block")}
    assert err["tensor"] > 3 * err["row"] > 0 and err["block"] < err["row"]
    # the smallest row (scale 0.01) is below one step of the per-tensor grid (~30/127): it is lost entirely
    small = {g: float((int8_roundtrip(x, method, g, 32)[0] - x[0]).norm() / x[0].norm()) for g in ("tensor", "row")}
    assert small["tensor"] > 0.5 and small["row"] < 0.01


def test_zeropoint_beats_absmax_on_one_sided_data():
    x = torch.rand(64, 64) + 1.0  # all in [1, 2]: absmax wastes the negative half of the codes
    assert int8_error(x, "zeropoint")["max_abs"] < 0.6 * int8_error(x, "absmax")["max_abs"]


@pytest.mark.parametrize("method", ["absmax", "zeropoint"])
@GRANULARITY
def test_zeros_and_zero_groups_give_no_nan(method, granularity):
    x = torch.zeros(4, 64)
    x[2] = torch.linspace(-1, 1, 64)  # one non-zero row (and block) among zeros
    out = int8_roundtrip(x, method, granularity, blocksize=64)
    assert bool(torch.isfinite(out).all())
    assert torch.equal(out[[0, 1, 3]], torch.zeros(3, 64))
    assert int8_roundtrip(torch.zeros(5, 3), method, granularity, 2).abs().sum() == 0
    if method == "absmax" and granularity == "row":
        q, scale = quantize_absmax(x, "row")
        assert scale.tolist()[:2] == [0.0, 0.0] and q[0].abs().sum() == 0


def test_roundtrip_keeps_dtype_and_int8_error_fields():
    x = torch.randn(8, 64, dtype=torch.float16)
    assert int8_roundtrip(x).dtype == torch.float16
    e = int8_error(torch.randn(32, 32, dtype=torch.float64), "absmax", "row")
    assert set(e) == {"rel_mse", "max_abs"} and 0 < e["rel_mse"] < 1e-4 and e["max_abs"] > 0


# ------------------------------------------------------------------ vector-wise int8 matmul


def test_vectorwise_quant_is_per_row_absmax():
    x = torch.randn(5, 40)
    q, c = vectorwise_quant(x)
    assert c.shape == (5,) and torch.equal(c, x.abs().amax(dim=1))
    assert torch.equal(q, torch.round(x * (127 / c.unsqueeze(1))).to(torch.int8))
    q0, c0 = vectorwise_quant(x, dim=0)  # per column
    assert c0.shape == (40,) and torch.equal(c0, x.abs().amax(dim=0))
    assert bool(((vectorwise_dequant(q0, c0, dim=0) - x).abs() <= c0 / 254 * (1 + 1e-5)).all())


def test_int8_matmul_is_exact_in_both_float_paths():
    g = torch.Generator().manual_seed(5)
    for d in (3, 1024, 1500):  # 1500 > 1024: summed in float64
        qx = torch.randint(-127, 128, (6, d), generator=g, dtype=torch.int8)
        qw = torch.randint(-127, 128, (4, d), generator=g, dtype=torch.int8)
        qx[0], qw[0] = 127, 127  # the largest possible sums
        qx[1], qw[1] = -127, 127
        out = int8_matmul(qx, qw)
        assert out.dtype == torch.int32
        assert torch.equal(out.long(), qx.long() @ qw.long().T)
        assert out[0, 0] == d * 127 * 127


def test_vectorwise_matmul_within_its_bound():
    torch.manual_seed(6)
    x, w = torch.randn(3, 7, 64, dtype=torch.float64), torch.randn(48, 64, dtype=torch.float64) * 0.1
    y, exact = int8_matmul_vectorwise(x, w), x @ w.T
    bound = vectorwise_error_bound(x, w)
    assert y.shape == (3, 7, 48) and y.dtype == torch.float64
    err = (y - exact).abs()
    assert bool((err <= bound + 1e-12).all())
    # a real bound: within ~10x of the worst error, and small against the outputs
    assert err.max() > 0.05 * bound.max() and bound.max() < 0.1 * exact.abs().max()
    # the rescale by the outer product of the absmax values, by hand
    qx, cx = vectorwise_quant(x.reshape(-1, 64))
    qw, cw = vectorwise_quant(w)
    manual = (qx.double() @ qw.double().T) * (cx.double().unsqueeze(1) * cw.double()) / 127**2
    assert torch.allclose(y.reshape(-1, 48), manual, rtol=1e-12, atol=0)


# ------------------------------------------------------------------ LLM.int8(): outlier decomposition


@pytest.fixture
def outlier_case():
    torch.manual_seed(7)
    x = inject_outlier(torch.randn(64, 128), column=7, magnitude=60.0)
    w = torch.randn(96, 128) * 0.05
    return x, w


def rel_err(y: torch.Tensor, exact: torch.Tensor) -> float:
    return float((y.double() - exact).norm() / exact.norm())


def test_inject_outlier(outlier_case):
    x, _ = outlier_case
    assert torch.equal(x[:, 7].abs(), torch.full((64,), 60.0)) and (x[:, 7] < 0).any() and (x[:, 7] > 0).any()
    assert outlier_columns(x).tolist() == [7]
    assert outlier_columns(x, threshold=None).numel() == 0 and outlier_columns(x, 0).numel() == 0


def test_per_tensor_int8_loses_the_ordinary_features_to_one_outlier(outlier_case):
    x, _ = outlier_case
    others = torch.ones(128, dtype=torch.bool)
    others[7] = False
    x_hat = int8_roundtrip(x, "absmax", "tensor")
    # step 60/127 ~= 0.47 for features of size ~1: ~14% error, vs ~0.5% without the outlier
    lost = float((x_hat - x)[:, others].norm() / x[:, others].norm())
    clean = int8_error(x[:, others], "absmax", "tensor")["rel_mse"] ** 0.5
    assert lost > 0.1 and lost > 10 * clean


def test_llm_int8_within_bound_and_far_better_than_per_tensor(outlier_case):
    x, w = outlier_case
    exact = x.double() @ w.double().T
    y = llm_int8_matmul(x, w)
    # the int8 part sees x and w without the outlier column, the outlier part is fp32
    x0, w0 = x.index_fill(1, torch.tensor([7]), 0), w.index_fill(1, torch.tensor([7]), 0)
    bound = vectorwise_error_bound(x0, w0)
    assert bool(((y.double() - exact).abs() <= bound + 1e-4).all())
    per_tensor = int8_roundtrip(x, "absmax", "tensor") @ int8_roundtrip(w, "absmax", "tensor").T
    no_decomposition = int8_matmul_vectorwise(x, w)  # every token's absmax is 60
    e_llm, e_tensor, e_vec = rel_err(y, exact), rel_err(per_tensor, exact), rel_err(no_decomposition, exact)
    assert e_tensor > 10 * e_llm and e_vec > 10 * e_llm
    assert e_llm < 0.003


def test_only_outlier_features_are_computed_exactly():
    x = torch.zeros(4, 16, dtype=torch.float64)
    x[:, 3] = torch.tensor([7.0, -8.0, 9.5, 6.0])  # the only non-zero feature is an outlier
    w = torch.randn(5, 16, dtype=torch.float64)
    assert torch.equal(llm_int8_matmul(x, w), x[:, 3:4] @ w[:, 3:4].T)


def test_threshold_above_every_value_is_pure_vectorwise(outlier_case):
    x, w = outlier_case
    pure = int8_matmul_vectorwise(x, w)
    for threshold in (1e9, None, 0):
        assert torch.equal(llm_int8_matmul(x, w, threshold=threshold), pure)
    bias = torch.randn(96)
    assert torch.allclose(llm_int8_matmul(x, w, bias, threshold=None), pure + bias)


def test_llm_int8_on_clean_input_matches_fp32():
    torch.manual_seed(8)
    x, w = torch.randn(2, 10, 64), torch.randn(32, 64) * 0.02
    y = llm_int8_matmul(x, w)
    assert outlier_columns(x).numel() == 0 and y.shape == (2, 10, 32)
    assert rel_err(y, x.double() @ w.double().T) < 0.01


# ------------------------------------------------------------------ Int8Linear and the model swap


def test_int8_linear_storage_and_forward(outlier_case):
    x, _ = outlier_case
    torch.manual_seed(9)
    linear = nn.Linear(128, 96)
    q = quantize_linear_int8(linear, threshold=6.0)
    assert isinstance(q, Int8Linear) and q.weight_q.dtype == torch.int8 and q.weight_absmax.shape == (96,)
    assert q.nbytes == 96 * 128 + 4 * 96 + 4 * 96  # int8 weight, fp32 absmax per row, fp32 bias
    assert torch.allclose(q.weight_absmax, linear.weight.abs().amax(dim=1))
    assert bool(((q.dequantized_weight() - linear.weight).abs() <= q.weight_absmax.unsqueeze(1) / 254 + 1e-7).all())
    with torch.no_grad():
        exact, y = linear(x).double(), q(x)
    assert q.last_outlier_columns.tolist() == [7]
    assert torch.equal(y, llm_int8_matmul_quantized(x, q.weight_q, q.weight_absmax, q.bias, 6.0))
    assert rel_err(y, exact) < 0.01
    pure = quantize_linear_int8(linear, threshold=None)
    with torch.no_grad():
        assert rel_err(pure(x), exact) > 5 * rel_err(y, exact)  # the outlier is what hurts
    assert pure.last_outlier_columns.numel() == 0
    assert q(x.half()).dtype == torch.float16


def test_model_swap_keeps_logits_close():
    torch.manual_seed(10)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    idx = torch.randint(0, 64, (4, 16))
    with torch.no_grad():
        ref = model(idx)
    fp_bytes = linear_weight_bytes(model)
    quantized = quantize_model_int8(copy.deepcopy(model))
    kinds = {name: type(m).__name__ for name, m in quantized.named_modules() if isinstance(m, (nn.Linear, Int8Linear))}
    assert sum(k == "Int8Linear" for k in kinds.values()) == 8  # 4 per block
    assert kinds["lm_head"] == "Linear" and quantized.lm_head.weight is quantized.wte.weight
    with torch.no_grad():
        out = quantized(idx)
    assert rel_err(out, ref.double()) < 0.02
    # weights: 4 -> 1 byte each; plus 4 bytes of absmax per row; biases stay fp32
    n_weights = 2 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32)
    n_rows = 2 * (96 + 32 + 128 + 32)
    assert fp_bytes == 4 * n_weights + 4 * n_rows
    assert linear_weight_bytes(quantized) == n_weights + 4 * n_rows + 4 * n_rows


# ------------------------------------------------------------------ bad input


def test_bad_input():
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="granularity"):
        quantize_absmax(x, "column")
    with pytest.raises(ValueError, match="granularity='row'"):
        quantize_zeropoint(torch.randn(8), "row")
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="blocksize"):
            quantize_absmax(x, "block", bad)
    with pytest.raises(ValueError, match="method"):
        int8_roundtrip(x, "nf4")
    with pytest.raises(ValueError, match="x contains NaN"):
        quantize_absmax(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="x contains NaN"):
        quantize_zeropoint(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="x contains NaN"):
        llm_int8_matmul(torch.tensor([[1.0, float("inf")]]), torch.ones(3, 2))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        quantize_absmax(torch.ones(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        vectorwise_quant([1.0, 2.0])
    with pytest.raises(ValueError, match="non-empty"):
        quantize_absmax(torch.empty(0))
    with pytest.raises(TypeError, match="q must be an int8"):
        dequantize_absmax(torch.zeros(3), torch.tensor(1.0))
    with pytest.raises(ValueError, match="scale has 2 values"):
        dequantize_absmax(torch.zeros(4, 3, dtype=torch.int8), torch.ones(2), "row")
    with pytest.raises(ValueError, match="zero_point has 1 values"):
        dequantize_zeropoint(torch.zeros(4, 3, dtype=torch.int8), torch.ones(4), torch.zeros(1), "row")
    with pytest.raises(ValueError, match="w must be 2-D"):
        llm_int8_matmul(x, torch.randn(2, 3, 64))
    with pytest.raises(ValueError, match="last dimension"):
        int8_matmul_vectorwise(x, torch.randn(8, 32))
    with pytest.raises(ValueError, match="share d"):
        int8_matmul(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(2, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match="threshold"):
        llm_int8_matmul(x, torch.randn(8, 64), threshold=-1.0)
    with pytest.raises(ValueError, match="column"):
        inject_outlier(x, 64)
    with pytest.raises(ValueError, match="magnitude"):
        inject_outlier(x, 0, float("nan"))
    with pytest.raises(TypeError, match="nn.Linear"):
        quantize_linear_int8(nn.Conv1d(2, 2, 1))
