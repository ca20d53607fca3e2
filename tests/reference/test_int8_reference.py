"""Conformance of minillm.quant.int8 with bitsandbytes' LLM.int8() functions (skipped without bitsandbytes).

Facts read from the installed bitsandbytes (0.50, CPU):
- `int8_vectorwise_quant(A, threshold)` returns (codes, row absmax, outlier columns); codes are
  round(A * (127 / absmax)) with torch.round (half to even), the product taken in float32. Ours multiplies
  by the same reciprocal, so the codes agree exactly, ties included.
- With a threshold, bitsandbytes zeroes only the *values* |A| >= threshold before taking each row's absmax,
  then zeroes whole outlier columns in the codes; the paper (and we) take the outlier columns out entirely.
  The two agree when an outlier column is large in every token (systematic outliers, as here).
- `int8_vectorwise_dequant` multiplies by a float constant for 1/127, we divide: equal to float rounding.
  `int8_mm_dequant` multiplies by the decimal constant 6.200124e-05 for 1/127^2 = 6.2000124e-05, which is
  1.8e-5 too large in relative terms, so rescaled matmul outputs agree to a relative 2e-5, not to float rounding.
- `Linear8bitLt` quantises its weight from float16 on the move to the CPU; on CPU its forward is
  weight-only (dequantise the int8 weight, then a float matmul; no activation quantisation or outlier split).
"""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
bnbf = pytest.importorskip("bitsandbytes.functional")

from minillm.quant.int8 import (
    Int8Linear,
    inject_outlier,
    int8_matmul,
    int8_matmul_vectorwise,
    outlier_columns,
    vectorwise_dequant,
    vectorwise_quant,
)


@pytest.fixture(autouse=True, scope="module")
def eager():
    """bitsandbytes may wrap kernels in torch.compile; eager runs the same maths without compile time."""
    with torch.compiler.set_stance("force_eager"):
        yield


def hard_rows(seed: int) -> torch.Tensor:
    """Rows whose absmax is 127 (exact scale 1) holding exact .5 ties, plus Gaussian rows of varied scale."""
    g = torch.Generator().manual_seed(seed)
    ties = torch.randint(-126, 126, (8, 96), generator=g).float() + 0.5
    ties[:, 0] = 127.0
    gauss = torch.randn(24, 96, generator=g) * torch.logspace(-3, 2, 24, dtype=torch.float32).unsqueeze(1)
    return torch.cat([ties, gauss])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_vectorwise_codes_and_scales_equal(dtype):
    x = hard_rows(0).to(dtype)
    q_ref, stats_ref, outliers = bnbf.int8_vectorwise_quant(x.clone())
    q, absmax = vectorwise_quant(x)
    assert outliers is None
    assert torch.equal(absmax, stats_ref)
    assert torch.equal(q, q_ref)  # exactly, including the .5 ties
    assert q[:8].abs().max() == 127 and bool((q[:8, 1:].float() % 2 == 0).all())  # ties went to even
    ours, theirs = vectorwise_dequant(q, absmax), bnbf.int8_vectorwise_dequant(q_ref, stats_ref)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=0)


def test_outlier_columns_and_codes_with_threshold():
    torch.manual_seed(1)
    x = inject_outlier(inject_outlier(torch.randn(16, 64), 5, 20.0), 40, 8.0)
    q_ref, stats_ref, cols_ref = bnbf.int8_vectorwise_quant(x.clone(), threshold=6.0)
    cols = outlier_columns(x, 6.0)
    assert cols.tolist() == cols_ref.tolist() == [5, 40]
    q, absmax = vectorwise_quant(x.index_fill(1, cols, 0))
    assert torch.equal(q, q_ref) and torch.equal(absmax, stats_ref)


def test_int8_matmul_and_rescale_equal():
    torch.manual_seed(2)
    x, w = torch.randn(12, 200), torch.randn(40, 200) * 0.05
    qx, cx = vectorwise_quant(x)
    qw, cw = vectorwise_quant(w)
    assert torch.equal(int8_matmul(qx, qw), bnbf.int8_linear_matmul(qx, qw))
    theirs = torch.ops.bitsandbytes.int8_scaled_mm.default(qx, qw, cx, cw, dtype=torch.float32)
    assert 6.200124e-05 * 127**2 == pytest.approx(1 + 1.8e-5, abs=1e-7)  # their 1/127^2
    assert torch.allclose(int8_matmul_vectorwise(x, w), theirs, rtol=2.5e-5, atol=1e-7)


def test_int8_linear_matches_mixed_int8_matmul():
    """Our Int8Linear (LLM.int8() with a stored int8 weight) against bitsandbytes' int8_mixed_scaled_mm."""
    torch.manual_seed(3)
    linear = torch.nn.Linear(64, 48)
    x = inject_outlier(torch.randn(20, 64), 9, 30.0)
    ours = Int8Linear.from_linear(linear, threshold=6.0)
    qx, cx, cols = bnbf.int8_vectorwise_quant(x.clone(), threshold=6.0)
    qw, cw, _ = bnbf.int8_vectorwise_quant(linear.weight.detach().clone())
    assert torch.equal(ours.weight_q, qw) and torch.equal(ours.weight_absmax, cw)
    theirs, _ = torch.ops.bitsandbytes.int8_mixed_scaled_mm.default(x, qx, qw, cx, cw, cols, linear.bias.detach())
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs, rtol=2.5e-5, atol=1e-4)  # outputs ~4: their 1/127^2 bias
        assert ours.last_outlier_columns.tolist() == [9]


def test_linear8bitlt_on_cpu():
    torch.manual_seed(4)
    linear = torch.nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight.copy_(linear.weight.half().float())  # bitsandbytes quantises from float16
    layer = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False, threshold=6.0)
    layer.weight = bnb.nn.Int8Params(linear.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
    layer.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    try:
        layer = layer.to("cpu")
    except (RuntimeError, NotImplementedError) as exc:  # pragma: no cover - depends on the build
        pytest.skip(f"Linear8bitLt does not quantise on this CPU build: {exc}")
    ours = Int8Linear.from_linear(linear, threshold=6.0)
    assert layer.weight.dtype == torch.int8
    assert torch.equal(ours.weight_q, layer.weight.data) and torch.equal(ours.weight_absmax, layer.weight.SCB)
    x = torch.randn(10, 64)
    with torch.no_grad():
        theirs = layer(x)  # CPU: x @ dequantised(W)^T + b
        weight_only = x @ ours.dequantized_weight().T + linear.bias
        assert torch.allclose(theirs, weight_only, rtol=1e-5, atol=1e-5)
        # ours also quantises the activations: close, within the int8 error of x
        assert float((ours(x) - theirs).norm() / theirs.norm()) < 0.01
