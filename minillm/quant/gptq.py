"""GPTQ: post-training weight quantisation that corrects each rounding error with the calibration Hessian.

GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers") quantises one linear layer W (d_out, d_in) at a time so that its outputs on calibration
inputs X (n, d_in) change as little as possible:

    minimise over the grid   ||X W^T - X W_q^T||_F^2  =  (n / 2) sum_rows (w - w_q) H (w - w_q)^T,    H = 2 X^T X / n

(we take the mean over the n tokens, as the paper's implementation accumulates it; scaling H changes
nothing below, because the damping is relative to mean(diag H) and the updates use ratios of H^-1 entries).

The rows of W share H, so they are processed together, column by column, left to right. Quantising
column q moves it by delta = w_q - Q(w_q); the Optimal Brain Surgeon update moves the columns not yet
quantised to absorb that change optimally:

    err = (w_q - Q(w_q)) / U_qq,    w_j <- w_j - err * U_qj   for j > q

where U is the upper Cholesky factor of H^-1 (H^-1 = U^T U): row q of U, divided by U_qq, is row q of the
inverse Hessian of the remaining columns divided by its diagonal, so no matrix is re-inverted per column.
Before that, H is damped, H += percdamp * mean(diag H) * I, and "dead" inputs (diag H = 0, a feature that is
always 0) get H_ii = 1 and a zero weight column, since nothing can be learned about them.

Lazy batch updates: the updates to columns beyond the current block of `block_size` columns are
accumulated in an error matrix E (d_out, block) and applied once per block, W[:, later] -= E U[block, later],
which turns many rank-1 updates into one matmul and gives the same result.

The grid is round-to-nearest (RTN) with 2^bits levels, one (scale, zero) per row and group of `group_size`
consecutive columns, computed when the group's first column is reached from the *current* (already updated)
values of the group's columns:

    asymmetric (sym=False):  lo = min(min w, 0), hi = max(max w, 0),  scale = (hi - lo) / (2^bits - 1),
                             zero = round(-lo / scale),   code = clamp(round(w / scale) + zero, 0, 2^bits - 1)
    symmetric  (sym=True):   scale = max |w| / (2^(bits-1) - 1),  zero = 2^(bits-1),
                             code = clamp(round(w / scale) + zero, 1, 2^bits - 1)     (code 0 unused)
    dequantised:             w_q = (code - zero) * scale

The range contains 0 so that zero is an integer code and w = 0 stays exactly 0; `torch.round` rounds half
to even. `act_order` first sorts the columns by decreasing diag(H) (the inputs with the most energy are
quantised first, while many columns remain to absorb their error) and un-sorts at the end; groups are then
consecutive in the *sorted* order, so `g_idx` maps each original column to its group.

Read top to bottom: the grid, RTN, the Hessian, GPTQ on one layer, the reconstruction error, then the
model-level functions that quantise a GPT layer by layer with forward hooks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "QuantizedWeight",
    "gptq_hessian",
    "gptq_quantize",
    "gptq_quantize_hessian",
    "gptq_quantize_model",
    "hessian_reconstruction_error",
    "layer_reconstruction_error",
    "quantize_grid",
    "rtn_quantize",
    "rtn_quantize_model",
]


@dataclass
class QuantizedWeight:
    """A group-quantised weight (d_out, d_in).

    weight:     the dequantised weight, input dtype, (d_out, d_in)
    codes:      uint8 (d_out, d_in) in [0, 2^bits - 1], original column order
    scales:     (d_out, n_groups) float, zeros: (d_out, n_groups) uint8 (integer codes of the value 0)
    g_idx:      int64 (d_in,): the group of each column (i // group_size unless act_order)
    perm:       int64 (d_in,) the order in which GPTQ visited the columns (act_order), else None
    """

    weight: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    sym: bool
    perm: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """w_ij = (codes_ij - zeros_i,g(j)) * scales_i,g(j), in the scales' dtype (equals `weight` bit for bit)."""
        return _dequantize(self.codes, self.scales[:, self.g_idx], self.zeros[:, self.g_idx])

    @property
    def bits_per_param(self) -> float:
        """bits + (16-bit scale + bits-bit zero) / group_size, as a packed kernel would store them."""
        return self.bits + (16 + self.bits) / self.group_size


# ====================================================================================================
# 1. the RTN grid


def quantize_grid(w: torch.Tensor, bits: int, sym: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of each slice w[..., :] (one group of one row): shapes w.shape[:-1].

    asymmetric: scale = (hi - lo) / (2^bits - 1), zero = round(-lo / scale), with lo <= 0 <= hi;
    symmetric:  scale = max|w| / (2^(bits-1) - 1), zero = 2^(bits-1).
    An all-zero slice gets scale 1 (any scale represents it exactly), so nothing divides by 0.
    """
    if sym:
        scale = w.abs().amax(dim=-1) / (2 ** (bits - 1) - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.full_like(scale, 2 ** (bits - 1))
    lo, hi = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
    scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, (-lo / scale).round()


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """code = clamp(round(w / scale) + zero, q_min, 2^bits - 1), as floats holding integers."""
    return ((w / scale).round() + zero).clamp(1 if sym else 0, 2**bits - 1)


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """w_q = (code - zero) * scale, in the scale's dtype."""
    return (codes.to(scale.dtype) - zero.to(scale.dtype)) * scale


def _group_size(group_size: int | None, d_in: int) -> int:
    return d_in if group_size is None else group_size


def _result(w_q: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
            g_idx: torch.Tensor, dtype: torch.dtype, bits: int, group_size: int, sym: bool,
            perm: torch.Tensor | None = None) -> QuantizedWeight:
    return QuantizedWeight(w_q.to(dtype), codes.to(torch.uint8), scales, zeros.to(torch.uint8), g_idx, bits,
                           group_size, sym, perm)


def rtn_quantize(weight: torch.Tensor, bits: int = 4, group_size: int | None = 128,
                 sym: bool = False) -> QuantizedWeight:
    """Round-to-nearest: every group of `group_size` columns of every row on its own grid, no error correction.

    weight (d_out, d_in); group_size must divide d_in (None: one group per row). The baseline GPTQ improves on.
    """
    _check_weight(weight)
    _check_quant_args(weight, bits, group_size, sym)
    d_out, d_in = weight.shape
    gs = _group_size(group_size, d_in)
    w = weight.detach().to(_work_dtype(weight))
    groups = w.view(d_out, d_in // gs, gs)  # (d_out, n_groups, group_size)
    scale, zero = quantize_grid(groups, bits, sym)  # (d_out, n_groups)
    codes = _codes(groups, scale.unsqueeze(-1), zero.unsqueeze(-1), bits, sym)
    codes = codes.view(d_out, d_in)
    g_idx = torch.arange(d_in, device=w.device) // gs
    return _result(_dequantize(codes, scale[:, g_idx], zero[:, g_idx]), codes, scale, zero, g_idx,
                   weight.dtype, bits, gs, sym)


# ====================================================================================================
# 2. GPTQ on one layer


def _work_dtype(weight: torch.Tensor) -> torch.dtype:
    """float64 for float64 weights, float32 otherwise (half-precision weights are quantised in float32)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def gptq_hessian(inputs: torch.Tensor) -> torch.Tensor:
    """H = 2 X^T X / n for calibration activations inputs (..., d_in), flattened to X (n, d_in): (d_in, d_in)."""
    _check_inputs(inputs)
    x = inputs.detach().reshape(-1, inputs.shape[-1])  # (n, d_in)
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return 2 * (x.T @ x) / x.shape[0]


def _inverse_hessian_factor(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """U upper triangular with U^T U = (H + percdamp * mean(diag H) * I)^-1, computed in float64."""
    h = h.double()
    d = h.shape[0]
    damp = percdamp * torch.diagonal(h).mean()
    h = h + damp * torch.eye(d, dtype=h.dtype, device=h.device)
    chol, info = torch.linalg.cholesky_ex(h)  # H = L L^T
    if int(info) != 0:
        raise ValueError(f"the damped Hessian is not positive definite (percdamp={percdamp}); increase percdamp")
    h_inv = torch.cholesky_inverse(chol)  # (L L^T)^-1
    return torch.linalg.cholesky(h_inv, upper=True)


def _current_group(w_block: torch.Tensor, w: torch.Tensor, errors: torch.Tensor, u: torch.Tensor,
                   i1: int, i: int, i2: int, g_end: int) -> torch.Tensor:
    """The current values of columns q = i1 + i .. g_end - 1, at the moment column q is reached: (d_out, g).

    Columns inside the block are up to date in w_block. Columns beyond the block (a group that straddles
    blocks) have not yet received this block's lazy updates, so they are applied here: W - E[:, :i] U[i1:q, ...].
    """
    current = w_block[:, i : min(g_end, i2) - i1]  # (d_out, <= g)
    if g_end > i2:
        pending = errors[:, :i] @ u[i1 : i1 + i, i2:g_end]  # (d_out, g_end - i2)
        current = torch.cat([current, w[:, i2:g_end] - pending], dim=1)
    return current


def gptq_quantize_hessian(
    weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int | None = 128,
    block_size: int = 128, percdamp: float = 0.01, act_order: bool = False, sym: bool = False,
) -> QuantizedWeight:
    """GPTQ of weight (d_out, d_in) given H (d_in, d_in) = 2 X^T X / n (`gptq_hessian`).

    bits in 2..8; group_size divides d_in (None: one group per row); block_size: columns per lazy batch;
    percdamp >= 0: damping relative to mean(diag H); act_order: visit columns by decreasing diag(H);
    sym: symmetric grid. Computed in float32 (float64 for float64 weights), the Cholesky in float64.
    """
    _check_weight(weight)
    _check_quant_args(weight, bits, group_size, sym)
    _check_hessian(hessian, weight.shape[1])
    _check_positive_int(block_size, "block_size")
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not 0 <= percdamp < float("inf"):
        raise ValueError(f"percdamp must be a finite number >= 0, got {percdamp!r}")
    if not isinstance(act_order, bool):
        raise TypeError(f"act_order must be a bool, got {type(act_order).__name__}")

    dtype = _work_dtype(weight)
    d_out, d_in = weight.shape
    gs = _group_size(group_size, d_in)
    w = weight.detach().to(dtype).clone()
    h = hessian.detach().double().clone()
    dead = torch.diagonal(h) == 0  # an input that is always 0: its column cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w, h = w[:, perm], h[perm][:, perm]
    u = _inverse_hessian_factor(h, percdamp).to(dtype)  # (d_in, d_in), upper triangular

    codes = torch.zeros_like(w)
    scales = torch.zeros(d_out, d_in // gs, dtype=dtype, device=w.device)
    zeros = torch.zeros_like(scales)
    for i1 in range(0, d_in, block_size):
        i2 = min(i1 + block_size, d_in)
        w_block = w[:, i1:i2].clone()  # (d_out, b), kept up to date inside the block
        errors = torch.zeros_like(w_block)  # E: the scaled errors err of the block's columns
        u_block = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            q = i1 + i
            if q % gs == 0:  # a new group: its grid from the current values of its columns
                group = _current_group(w_block, w, errors, u, i1, i, i2, q + gs)
                scales[:, q // gs], zeros[:, q // gs] = quantize_grid(group, bits, sym)
            scale, zero = scales[:, q // gs], zeros[:, q // gs]
            codes[:, q] = _codes(w_block[:, i], scale, zero, bits, sym)
            err = (w_block[:, i] - _dequantize(codes[:, q], scale, zero)) / u_block[i, i]  # (d_out,)
            w_block[:, i:] -= err.unsqueeze(1) * u_block[i, i:].unsqueeze(0)  # OBS update of the block
            errors[:, i] = err
        w[:, i2:] -= errors @ u[i1:i2, i2:]  # the lazy batch update of every later column

    g_idx = torch.arange(d_in, device=w.device) // gs  # group of each visited position
    if perm is not None:
        inverse = torch.argsort(perm)
        codes, g_idx = codes[:, inverse], g_idx[inverse]  # back to the original column order
    w_q = _dequantize(codes, scales[:, g_idx], zeros[:, g_idx])
    return _result(w_q, codes, scales, zeros, g_idx, weight.dtype, bits, gs, sym, perm)


def gptq_quantize(
    weight: torch.Tensor, inputs: torch.Tensor, bits: int = 4, group_size: int | None = 128,
    block_size: int = 128, percdamp: float = 0.01, act_order: bool = False, sym: bool = False,
) -> QuantizedWeight:
    """GPTQ of weight (d_out, d_in) (nn.Linear layout) on calibration activations inputs (..., d_in).

    `gptq_quantize_hessian(weight, gptq_hessian(inputs), ...)`; see there for the arguments.
    """
    _check_weight(weight)
    _check_inputs(inputs, weight.shape[1])
    return gptq_quantize_hessian(weight, gptq_hessian(inputs), bits, group_size, block_size, percdamp,
                                 act_order, sym)


def layer_reconstruction_error(weight: torch.Tensor, weight_q: torch.Tensor, inputs: torch.Tensor) -> float:
    """||X W^T - X W_q^T||_F^2 / ||X W^T||_F^2: GPTQ's objective, relative to the layer's output energy.

    inputs (..., d_in) flattened to X (n, d_in); computed in float64.
    """
    _check_weight(weight)
    _check_inputs(inputs, weight.shape[1])
    if not isinstance(weight_q, torch.Tensor) or weight_q.shape != weight.shape:
        raise ValueError(f"weight_q must have weight's shape {tuple(weight.shape)}, got "
                         f"{tuple(getattr(weight_q, 'shape', ()))}")
    x = inputs.detach().reshape(-1, inputs.shape[-1]).double()  # (n, d_in)
    y = x @ weight.detach().double().T
    diff = y - x @ weight_q.detach().double().T
    return float(diff.square().sum() / y.square().sum())


def hessian_reconstruction_error(weight: torch.Tensor, weight_q: torch.Tensor, hessian: torch.Tensor) -> float:
    """The same ratio from H = 2 X^T X / n, without the inputs: tr(D H D^T) / tr(W H W^T), D = W - W_q."""
    _check_hessian(hessian, weight.shape[1])
    h = hessian.detach().double()
    w, d = weight.detach().double(), (weight.detach().double() - weight_q.detach().double())
    return float(((d @ h) * d).sum() / ((w @ h) * w).sum())


# ====================================================================================================
# 3. a whole model, layer by layer


class _StopForward(Exception):
    """Raised by the capture hook: the rest of the forward pass is not needed for this layer."""


def _target_linears(model: nn.Module, skip: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    """Every nn.Linear whose own name is not in `skip`, in registration order (GPT: execution order)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rpartition(".")[2] not in skip]


def _capture_hessian(model: nn.Module, layer: nn.Linear, batches: list[torch.Tensor], name: str) -> torch.Tensor:
    """H = 2 X^T X / n of the inputs `layer` receives when the model runs on every calibration batch.

    A forward pre-hook adds each batch's X^T X and then stops the forward pass: the layers after this one
    do not affect its inputs.
    """
    d_in = layer.in_features
    dtype = torch.float64 if layer.weight.dtype == torch.float64 else torch.float32
    total = {"h": torch.zeros(d_in, d_in, dtype=dtype, device=layer.weight.device), "n": 0}

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().reshape(-1, d_in).to(dtype)  # (tokens, d_in)
        total["h"] += 2 * (x.T @ x)
        total["n"] += x.shape[0]
        raise _StopForward

    handle = layer.register_forward_pre_hook(hook)
    try:
        for idx in batches:
            try:
                model(idx.to(layer.weight.device))  # calibration tokens may live on the CPU
            except _StopForward:
                pass
    finally:
        handle.remove()
    if total["n"] == 0:
        raise ValueError(f"layer {name!r} received no calibration inputs: is it used in model(idx)?")
    return total["h"] / total["n"]


def gptq_quantize_model(
    model: nn.Module, calibration_batches: Iterable[torch.Tensor], bits: int = 4, group_size: int | None = 128,
    block_size: int = 128, percdamp: float = 0.01, act_order: bool = False, sym: bool = False,
    skip: tuple[str, ...] = ("lm_head",), report: dict[str, dict[str, float]] | None = None,
) -> nn.Module:
    """GPTQ every nn.Linear of `model` (except names in `skip`), sequentially, in place; returns the model.

    calibration_batches: (B, T) token tensors for `model(idx)`. Layers are quantised in the order they run
    (c_attn, attn.c_proj, c_fc, mlp.c_proj, block after block), and each layer's H comes from a forward
    pass in which every earlier layer is already quantised, so later layers correct for the error of
    earlier ones (the paper's sequential scheme). The quantised weights are written back dequantised.
    GPT's `lm_head` is tied to the embedding `wte`, so it stays in full precision.

    report: if a dict, filled with {layer name: {"gptq": error, "rtn": error}}, the relative output error
    (`hessian_reconstruction_error`) of GPTQ and of RTN on the same calibration inputs of that layer.
    """
    batches = _check_batches(calibration_batches)
    _check_quant_args_early(bits, group_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for name, layer in _target_linears(model, skip):
                h = _capture_hessian(model, layer, batches, name)
                result = gptq_quantize_hessian(layer.weight, h, bits, group_size, block_size, percdamp,
                                               act_order, sym)
                if report is not None:
                    rtn = rtn_quantize(layer.weight, bits, group_size, sym)
                    report[name] = {"gptq": hessian_reconstruction_error(layer.weight, result.weight, h),
                                    "rtn": hessian_reconstruction_error(layer.weight, rtn.weight, h)}
                layer.weight.copy_(result.weight)
    finally:
        model.train(was_training)
    return model


def rtn_quantize_model(model: nn.Module, bits: int = 4, group_size: int | None = 128, sym: bool = False,
                       skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Round-to-nearest every nn.Linear of `model` except `skip`, in place (the baseline); returns the model."""
    _check_quant_args_early(bits, group_size)
    with torch.no_grad():
        for _, layer in _target_linears(model, skip):
            layer.weight.copy_(rtn_quantize(layer.weight, bits, group_size, sym).weight)
    return model


# ====================================================================================================
# input checks


def _check_weight(weight: object) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"weight must be a non-empty 2-D (d_out, d_in) tensor, got shape {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN or infinite values")


def _check_positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_quant_args_early(bits: object, group_size: object) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    if group_size is not None:
        _check_positive_int(group_size, "group_size")


def _check_quant_args(weight: torch.Tensor, bits: object, group_size: object, sym: object) -> None:
    _check_quant_args_early(bits, group_size)
    if group_size is not None and weight.shape[1] % group_size:
        raise ValueError(f"group_size ({group_size}) must divide the input dimension d_in ({weight.shape[1]})")
    if not isinstance(sym, bool):
        raise TypeError(f"sym must be a bool, got {type(sym).__name__}")


def _check_inputs(inputs: object, d_in: int | None = None) -> None:
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if not inputs.is_floating_point():
        raise TypeError(f"inputs must be a floating-point tensor, got dtype {inputs.dtype}")
    if inputs.dim() < 1 or inputs.numel() == 0:
        raise ValueError(f"inputs must hold at least one token (row) of calibration data, got shape "
                         f"{tuple(inputs.shape)}")
    if d_in is not None and inputs.shape[-1] != d_in:
        raise ValueError(f"inputs' last dimension ({inputs.shape[-1]}) must equal weight's d_in ({d_in})")
    if not bool(torch.isfinite(inputs).all()):
        raise ValueError("inputs contain NaN or infinite values")


def _check_hessian(hessian: object, d_in: int) -> None:
    if not isinstance(hessian, torch.Tensor) or not hessian.is_floating_point():
        raise TypeError(f"hessian must be a floating-point torch.Tensor, got {type(hessian).__name__}")
    if hessian.shape != (d_in, d_in):
        raise ValueError(f"hessian must be (d_in, d_in) = ({d_in}, {d_in}), got {tuple(hessian.shape)}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("hessian contains NaN or infinite values")


def _check_batches(batches: object) -> list[torch.Tensor]:
    if isinstance(batches, torch.Tensor):
        batches = [batches]  # one (B, T) batch
    batches = list(batches)  # type: ignore[arg-type]
    if not batches:
        raise ValueError("calibration_batches must hold at least one (B, T) batch of token ids")
    for b in batches:
        if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.is_floating_point() or b.numel() == 0:
            raise ValueError("calibration_batches must be non-empty (B, T) integer token tensors, got "
                             f"{type(b).__name__} {tuple(getattr(b, 'shape', ()))}")
    return batches
