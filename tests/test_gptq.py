"""GPTQ and round-to-nearest group quantisation (minillm.quant.gptq)."""

import copy

import pytest
import torch
from torch import nn

from minillm.model import GPT, GPTConfig
from minillm.quant.gptq import (
    QuantizedWeight,
    gptq_hessian,
    gptq_quantize,
    gptq_quantize_hessian,
    gptq_quantize_model,
    hessian_reconstruction_error,
    layer_reconstruction_error,
    quantize_grid,
    rtn_quantize,
    rtn_quantize_model,
)


def correlated_layer(seed: int = 0, d_out: int = 64, d_in: int = 128, n: int = 2048, dtype=torch.float32):
    """W and inputs X = Z A: a random mixing matrix A makes H = 2 X^T X / n far from diagonal."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=dtype)
    x = torch.randn(n, d_in, generator=g, dtype=dtype) @ torch.randn(d_in, d_in, generator=g, dtype=dtype)
    return w, x


# ------------------------------------------------------------------ a reference written differently


def grid_by_hand(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = torch.clamp(w.min(dim=1).values, max=0), torch.clamp(w.max(dim=1).values, min=0)
    scale = (hi - lo) / (2**bits - 1)
    scale[scale == 0] = 1
    return scale, torch.round(-lo / scale)


def obq_reference(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, percdamp: float) -> torch.Tensor:
    """Column by column with the OBS formula on an explicitly inverted Hessian of the remaining columns,
    no Cholesky, no lazy batches:  delta_F = -(w_q - Q(w_q)) / [H_F^-1]_qq * [H_F^-1]_{q, F}."""
    w, h = w.double().clone(), h.double()
    d_in = w.shape[1]
    h = h + percdamp * h.diagonal().mean() * torch.eye(d_in, dtype=h.dtype)
    codes = torch.zeros_like(w)
    for q in range(d_in):
        if q % group_size == 0:
            scale, zero = grid_by_hand(w[:, q : q + group_size], bits)
        codes[:, q] = torch.clamp(torch.round(w[:, q] / scale) + zero, 0, 2**bits - 1)
        h_inv = torch.linalg.inv(h[q:, q:])  # inverse Hessian of the columns not yet quantised
        delta = w[:, q] - (codes[:, q] - zero) * scale
        w[:, q:] -= delta.unsqueeze(1) * (h_inv[0] / h_inv[0, 0]).unsqueeze(0)
    return codes


@pytest.mark.parametrize("group_size, block_size", [(48, 1), (48, 48), (16, 7), (24, 20), (16, 32)])
def test_gptq_equals_the_column_by_column_obs_reference(group_size, block_size):
    # (24, 20) and (16, 7): groups straddle lazy-batch blocks, their grids need the pending updates
    w, x = correlated_layer(1, d_out=6, d_in=48, n=256, dtype=torch.float64)
    h = gptq_hessian(x)
    result = gptq_quantize_hessian(w, h, bits=3, group_size=group_size, block_size=block_size, percdamp=0.01)
    assert torch.equal(result.codes.double(), obq_reference(w, h, 3, group_size, 0.01))


# ------------------------------------------------------------------ GPTQ against round-to-nearest


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn_on_correlated_inputs(bits):
    w, x = correlated_layer(0)
    gptq = gptq_quantize(w, x, bits=bits, group_size=32, block_size=32)
    rtn = rtn_quantize(w, bits=bits, group_size=32)
    e_gptq, e_rtn = layer_reconstruction_error(w, gptq.weight, x), layer_reconstruction_error(w, rtn.weight, x)
    assert e_gptq < 0.7 * e_rtn  # measured ~0.5
    ordered = gptq_quantize(w, x, bits=bits, group_size=32, block_size=32, act_order=True)
    assert layer_reconstruction_error(w, ordered.weight, x) < 0.7 * e_rtn


def test_gptq_and_rtn_are_alike_on_white_inputs():
    w, _ = correlated_layer(2)
    x = torch.randn(8192, 128, generator=torch.Generator().manual_seed(3))  # H ~ 2 I
    e_gptq = layer_reconstruction_error(w, gptq_quantize(w, x, bits=4, group_size=32).weight, x)
    e_rtn = layer_reconstruction_error(w, rtn_quantize(w, bits=4, group_size=32).weight, x)
    assert 0.85 * e_rtn < e_gptq <= 1.02 * e_rtn


def test_diagonal_hessian_gives_exactly_rtn():
    # with H diagonal, U is diagonal and no error is passed on: GPTQ is round-to-nearest
    w, _ = correlated_layer(4)
    h = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(5)) + 0.5)
    gptq, rtn = gptq_quantize_hessian(w, h, bits=4, group_size=32), rtn_quantize(w, bits=4, group_size=32)
    assert torch.equal(gptq.codes, rtn.codes) and torch.equal(gptq.weight, rtn.weight)


def test_eight_bit_error_is_tiny():
    w, x = correlated_layer(6)
    e = layer_reconstruction_error(w, gptq_quantize(w, x, bits=8, group_size=32).weight, x)
    assert 0 < e < 1e-4


def test_hessian_scale_does_not_matter():
    w, x = correlated_layer(7, d_in=64, dtype=torch.float64)
    h = gptq_hessian(x)
    a, b = gptq_quantize_hessian(w, h, group_size=16), gptq_quantize_hessian(w, 1000 * h, group_size=16)
    assert torch.equal(a.codes, b.codes) and torch.allclose(a.weight, b.weight, rtol=1e-12)


def test_results_are_deterministic():
    w, x = correlated_layer(8)
    a, b = (gptq_quantize(w, x, bits=4, group_size=32, act_order=True) for _ in range(2))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.weight, b.weight)


# ------------------------------------------------------------------ codes, groups and the stored form


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_groups_and_dequantisation(bits, sym):
    w, x = correlated_layer(9, d_out=16, d_in=64, n=512)
    w = w * torch.tensor([0.01, 1.0, 10.0, 0.1]).repeat_interleave(16)  # four groups of very different size
    for r in (gptq_quantize(w, x, bits=bits, group_size=16, sym=sym), rtn_quantize(w, bits=bits, group_size=16,
                                                                                   sym=sym)):
        assert isinstance(r, QuantizedWeight) and r.codes.dtype == torch.uint8 and r.weight.dtype == w.dtype
        assert int(r.codes.max()) <= 2**bits - 1 and int(r.codes.min()) >= (1 if sym else 0)
        assert r.scales.shape == r.zeros.shape == (16, 4) and torch.equal(r.g_idx, torch.arange(64) // 16)
        assert torch.equal(r.dequantize(), r.weight)  # the stored codes give exactly the returned weight
        # every group has its own scale, following its magnitude
        group_scale = r.scales.mean(dim=0)
        assert bool((group_scale[1] > 50 * group_scale[0]) & (group_scale[2] > 5 * group_scale[1]))
        if sym:
            assert bool((r.zeros == 2 ** (bits - 1)).all())
    rtn = rtn_quantize(w, bits=bits, group_size=16, sym=sym)
    scale, zero = quantize_grid(w.view(16, 4, 16), bits, sym)
    assert torch.equal(rtn.scales, scale) and torch.equal(rtn.zeros, zero.to(torch.uint8))


def test_rtn_hand_case():
    w = torch.tensor([[-0.9, 0.4, 0.1, 0.3]])  # lo -0.9, hi 0.4: scale 1.3 / 3, zero round(2.08) = 2
    r = rtn_quantize(w, bits=2, group_size=None)
    assert r.scales.item() == pytest.approx(1.3 / 3) and r.zeros.item() == 2
    # -0.9 / s = -2.08 -> 0; 0.4 / s = 0.92 -> 3; 0.1 / s = 0.23 -> 2; 0.3 / s = 0.69 -> 3
    assert r.codes.tolist() == [[0, 3, 2, 3]]
    assert r.weight[0].tolist() == pytest.approx([-2 * 1.3 / 3, 1.3 / 3, 0.0, 1.3 / 3])
    assert r.bits_per_param == 2 + 18 / 4


def test_act_order_visits_columns_by_decreasing_hessian_diagonal():
    w, x = correlated_layer(10, d_in=64)
    x = x * torch.rand(64, generator=torch.Generator().manual_seed(11))  # distinct input energies
    r = gptq_quantize(w, x, bits=4, group_size=16, act_order=True)
    diag = gptq_hessian(x).diagonal()
    assert torch.equal(r.perm, torch.argsort(diag, descending=True))
    # groups are consecutive in the visiting order: group k holds columns perm[16k : 16k + 16]
    for k in range(4):
        assert sorted(torch.nonzero(r.g_idx == k).view(-1).tolist()) == sorted(r.perm[16 * k : 16 * k + 16].tolist())
    assert torch.equal(r.dequantize(), r.weight)


def test_dead_inputs_get_a_zero_column():
    w, x = correlated_layer(12, d_in=32, n=256)
    x[:, 5] = 0  # feature 5 is never active
    r = gptq_quantize(w, x, bits=4, group_size=16)
    assert torch.equal(r.weight[:, 5], torch.zeros(64))
    assert bool(torch.isfinite(r.weight).all())


def test_reconstruction_error_forms_agree():
    w, x = correlated_layer(13, d_in=32, n=300)
    w_q = rtn_quantize(w, bits=3, group_size=16).weight
    e = layer_reconstruction_error(w, w_q, x)
    assert e == pytest.approx(hessian_reconstruction_error(w, w_q, gptq_hessian(x)), rel=1e-6)
    y, y_q = x.double() @ w.double().T, x.double() @ w_q.double().T
    assert e == pytest.approx(float((y - y_q).square().sum() / y.square().sum()), rel=1e-9)
    assert layer_reconstruction_error(w, w, x) == 0


# ------------------------------------------------------------------ a whole model


@pytest.fixture(scope="module")
def tiny_gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randint(0, 64, (8, 16), generator=g) for _ in range(4)]
    held_out = torch.randint(0, 64, (8, 16), generator=g)
    with torch.no_grad():
        reference = model(held_out)
    return model, calibration, held_out, reference


def logit_error(model: nn.Module, idx: torch.Tensor, reference: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(idx) - reference).norm() / reference.norm())


def test_model_gptq_at_8_bits_keeps_logits_close(tiny_gpt):
    model, calibration, held_out, reference = tiny_gpt
    quantized = gptq_quantize_model(copy.deepcopy(model), calibration, bits=8, group_size=16, block_size=16)
    assert 0 < logit_error(quantized, held_out, reference) < 0.005


def test_model_gptq_beats_rtn_at_4_bits(tiny_gpt):
    model, calibration, held_out, reference = tiny_gpt
    report = {}
    quantized = copy.deepcopy(model).train()
    gptq_quantize_model(quantized, calibration, bits=4, group_size=16, block_size=16, report=report)
    assert quantized.training  # the mode is restored
    rtn = rtn_quantize_model(copy.deepcopy(model), bits=4, group_size=16)
    names = [f"h.{i}.{n}" for i in range(2) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert list(report) == names  # every block linear, in execution order; not lm_head
    assert sum(r["gptq"] for r in report.values()) < 0.7 * sum(r["rtn"] for r in report.values())
    quantized.eval()
    assert logit_error(quantized, held_out, reference) < 0.85 * logit_error(rtn, held_out, reference)
    # lm_head (tied to wte) and everything that is not a block linear is unchanged
    changed = {n for n, p in quantized.named_parameters() if not torch.equal(p, model.get_parameter(n))}
    assert changed == {f"{n}.weight" for n in names}
    assert quantized.lm_head.weight is quantized.wte.weight
    # the written-back weights lie on a 4-bit grid: at most 16 distinct values per row and group
    w = quantized.h[0].mlp.c_fc.weight.view(128, 2, 16)
    assert max(len(torch.unique(w[i, g])) for i in range(128) for g in range(2)) <= 16


# ------------------------------------------------------------------ bad input


def test_bad_input():
    w, x = correlated_layer(14, d_out=8, d_in=32, n=64)
    with pytest.raises(ValueError, match="group_size .* must divide the input dimension d_in"):
        gptq_quantize(w, x, group_size=24)
    with pytest.raises(ValueError, match="group_size .* must divide"):
        rtn_quantize(w, group_size=64)
    for bits in (1, 9, 4.0, True):
        with pytest.raises(ValueError, match="bits must be an int in 2..8"):
            gptq_quantize(w, x, bits=bits, group_size=16)
    with pytest.raises(ValueError, match="percdamp"):
        gptq_quantize(w, x, group_size=16, percdamp=-0.1)
    with pytest.raises(ValueError, match="block_size"):
        gptq_quantize(w, x, group_size=16, block_size=0)
    with pytest.raises(ValueError, match="weight must be a non-empty 2-D"):
        gptq_quantize(w[0], x, group_size=16)
    with pytest.raises(ValueError, match="inputs' last dimension"):
        gptq_quantize(w, x[:, :16], group_size=16)
    with pytest.raises(ValueError, match="at least one token"):
        gptq_quantize(w, x[:0], group_size=16)
    with pytest.raises(ValueError, match="inputs contain NaN"):
        gptq_quantize(w, x.index_fill(0, torch.tensor([3]), float("nan")), group_size=16)
    with pytest.raises(ValueError, match="weight contains NaN"):
        rtn_quantize(w.index_fill(1, torch.tensor([0]), float("inf")), group_size=16)
    with pytest.raises(TypeError, match="weight must be a floating-point"):
        rtn_quantize(torch.ones(4, 16, dtype=torch.int64), group_size=16)
    with pytest.raises(TypeError, match="sym must be a bool"):
        rtn_quantize(w, group_size=16, sym="yes")
    with pytest.raises(ValueError, match="hessian must be"):
        gptq_quantize_hessian(w, torch.eye(16), group_size=16)
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize_hessian(w, torch.ones(32, 32), group_size=16,
                              percdamp=0.0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32))
    with pytest.raises(ValueError, match="calibration_batches"):
        gptq_quantize_model(model, [], group_size=16)
    with pytest.raises(ValueError, match="calibration_batches"):
        gptq_quantize_model(model, [torch.randn(2, 8)], group_size=16)
    with pytest.raises(ValueError, match="group_size .* must divide"):
        gptq_quantize_model(model, [torch.randint(0, 64, (2, 8))], group_size=128)
