"""8-bit integer quantisation: absmax and zero-point int8, and LLM.int8() matrix multiplication.

Absmax (symmetric) int8 maps [-absmax, absmax] onto the integers -127..127:

    scale = absmax / 127,    q = clamp(round(x / scale), -127, 127),    x ~= q * scale

Zero-point (asymmetric, affine) int8 maps [lo, hi] onto -128..127, with lo = min(min x, 0) and
hi = max(max x, 0), the range widened to contain 0 so that 0 is exactly representable (a zero-point
in int8 range; padding and ReLU zeros stay exact):

    scale = (hi - lo) / 255,    z = round(-lo / scale) - 128,    q = clamp(round(x / scale) + z, -128, 127),
    x ~= (q - z) * scale

Every `round` here is `torch.round`: round half to even (2.5 -> 2, 3.5 -> 4, -0.5 -> -0), the IEEE
default and what bitsandbytes uses. Away from clamping, |x - dequant(q)| <= scale / 2.

Granularity says which values share one scale: "tensor" (one scale), "row" (one per slice x[i], i.e. per
output row of an (out, in) weight) or "block" (`blocksize` consecutive values of the flattened tensor; a
partial last block gets its own scale). Finer granularity means smaller ranges and smaller errors, for
4 bytes of scale per group.

LLM.int8() (Dettmers et al., 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale")
computes Y = X W^T for X (tokens, d_in) and W (d_out, d_in) in two parts:

  1. vector-wise int8: each row of X (a token) and each row of W (an output channel) gets its own absmax,
     c_x (tokens,) and c_w (d_out,); the int8 products are summed exactly in integers and rescaled by the
     outer product of the absmax values:

         Y ~= (Q_x Q_w^T) * (c_x c_w^T) / 127^2

  2. outlier decomposition: the input features (columns of X) where any |x| >= threshold (6.0) are taken
     out and multiplied in full precision against the matching columns of W, the rest goes through step 1:

         Y = X[:, O] W[:, O]^T + int8(X[:, ~O]) int8(W[:, ~O])^T

Large models (> ~6.7B parameters) develop a few such outlier features, of magnitude up to ~60, in most
layers. In per-tensor or per-token int8 a single value of 60 sets the scale to 60/127 ~= 0.47, so the
ordinary features (|x| ~ 1) keep only ~2 bits. Taking those few columns out keeps the scale near 1/127.

Read top to bottom: the input checks' helpers, absmax and zero-point int8 with their granularities, the
vector-wise matmul, LLM.int8(), then `Int8Linear` and the model swap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GRANULARITIES",
    "METHODS",
    "Int8Linear",
    "dequantize_absmax",
    "dequantize_zeropoint",
    "inject_outlier",
    "int8_error",
    "int8_matmul",
    "int8_matmul_vectorwise",
    "int8_roundtrip",
    "linear_weight_bytes",
    "llm_int8_matmul",
    "llm_int8_matmul_quantized",
    "outlier_columns",
    "quantize_absmax",
    "quantize_linear_int8",
    "quantize_model_int8",
    "quantize_zeropoint",
    "vectorwise_dequant",
    "vectorwise_error_bound",
    "vectorwise_quant",
]

GRANULARITIES = ("tensor", "row", "block")
METHODS = ("absmax", "zeropoint")

Q_MAX = 127  # absmax int8 uses -127..127: symmetric, so -x quantises to -q
# Float32 adds integers exactly while every partial sum stays below 2^24, so an int8 dot product of
# length d is exact in float32 when d * 128^2 <= 2^24, i.e. d <= 1024; longer ones go through float64.
_FP32_EXACT_LEN = 2**24 // 128**2
_INT32_MAX_LEN = (2**31 - 1) // 128**2  # longest int8 dot product whose sum always fits in int32


# ====================================================================================================
# 1. absmax and zero-point int8 at three granularities


def _groups(x: torch.Tensor, granularity: str, blocksize: int) -> torch.Tensor:
    """View x as (n_groups, group_len) so that each row shares one scale.

    tensor: (1, n);  row: (x.shape[0], n / x.shape[0]);  block: (ceil(n / blocksize), blocksize), the last
    block zero-padded (zeros change neither its absmax nor, with 0 always in the range, its min/max).
    """
    if granularity == "tensor":
        return x.reshape(1, -1)  # (1, n)
    if granularity == "row":
        return x.reshape(x.shape[0], -1)  # (rows, n / rows)
    flat = x.reshape(-1)
    pad = -flat.numel() % blocksize
    return F.pad(flat, (0, pad)).view(-1, blocksize)  # (n_blocks, blocksize)


def _ungroup(groups: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of `_groups`: drop the padding of a partial last block, restore the shape."""
    n = shape.numel()
    return groups.reshape(-1)[:n].view(shape)


def _scale_shape(scale: torch.Tensor, granularity: str) -> torch.Tensor:
    """(n_groups, 1) -> () for "tensor", (n_groups,) otherwise."""
    return scale.reshape(()) if granularity == "tensor" else scale.reshape(-1)


def _absmax_reciprocal(absmax: torch.Tensor) -> torch.Tensor:
    """127 / absmax, and 0 where absmax is 0 (an all-zero group then quantises to 0, not NaN).

    Quantisation multiplies by this instead of dividing by scale = absmax / 127: x * (127 / a) and
    x / (a / 127) can differ in the last bit, which flips a code on a near-tie, and bitsandbytes (whose
    codes tests/reference/test_int8_reference.py compares with ours) multiplies.
    """
    return torch.where(absmax > 0, Q_MAX / absmax, torch.zeros_like(absmax))


def quantize_absmax(
    x: torch.Tensor, granularity: str = "tensor", blocksize: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: scale = absmax / 127, q = clamp(round(x * 127 / absmax), -127, 127).

    Returns (q, scale): q int8 with x's shape; scale fp32 of shape () for "tensor", (x.shape[0],) for "row",
    (ceil(x.numel() / blocksize),) for "block". An all-zero group gets scale 0 and codes 0.
    """
    _check_float_tensor(x, "x")
    _check_granularity(granularity, x, blocksize)
    groups = _groups(x.detach().float(), granularity, blocksize)  # (n_groups, group_len)
    absmax = groups.abs().amax(dim=1, keepdim=True)  # (n_groups, 1)
    _check_finite(absmax, "x")
    q = (groups * _absmax_reciprocal(absmax)).round_().clamp_(-Q_MAX, Q_MAX).to(torch.int8)
    return _ungroup(q, x.shape), _scale_shape(absmax / Q_MAX, granularity)


def dequantize_absmax(
    q: torch.Tensor, scale: torch.Tensor, granularity: str = "tensor", blocksize: int = 64,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of `quantize_absmax`: x ~= q * scale (scale broadcast over its group), in `dtype`."""
    _check_int8(q, "q")
    _check_granularity(granularity, q, blocksize)
    groups = _groups(q.float(), granularity, blocksize)  # (n_groups, group_len)
    _check_scale_count(scale, groups.shape[0], "scale")
    return _ungroup(groups * scale.float().reshape(-1, 1), q.shape).to(dtype)


def quantize_zeropoint(
    x: torch.Tensor, granularity: str = "tensor", blocksize: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Affine int8 over [lo, hi] = [min(min x, 0), max(max x, 0)]:

        scale = (hi - lo) / 255,   z = round(-lo / scale) - 128,   q = clamp(round(x / scale) + z, -128, 127)

    Returns (q int8 with x's shape, scale fp32, zero_point int8), scale and zero_point shaped as in
    `quantize_absmax`. lo maps to -128 and hi to 127 (up to rounding); because the range contains 0,
    z lies in [-128, 127] and x = 0 dequantises to exactly 0. An all-zero group gets scale 0.
    """
    _check_float_tensor(x, "x")
    _check_granularity(granularity, x, blocksize)
    groups = _groups(x.detach().float(), granularity, blocksize)  # (n_groups, group_len)
    lo = groups.amin(dim=1, keepdim=True).clamp(max=0)  # (n_groups, 1)
    hi = groups.amax(dim=1, keepdim=True).clamp(min=0)
    _check_finite(torch.cat([lo, hi]), "x")
    scale = (hi - lo) / 255
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: any divisor gives q = z
    zero_point = (-lo / safe).round() - 128
    q = ((groups / safe).round_() + zero_point).clamp_(-128, 127).to(torch.int8)
    return (_ungroup(q, x.shape), _scale_shape(scale, granularity),
            _scale_shape(zero_point, granularity).to(torch.int8))


def dequantize_zeropoint(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, granularity: str = "tensor",
    blocksize: int = 64, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of `quantize_zeropoint`: x ~= (q - z) * scale, in `dtype`."""
    _check_int8(q, "q")
    _check_granularity(granularity, q, blocksize)
    groups = _groups(q.float(), granularity, blocksize)  # (n_groups, group_len)
    _check_scale_count(scale, groups.shape[0], "scale")
    _check_scale_count(zero_point, groups.shape[0], "zero_point")
    deq = (groups - zero_point.float().reshape(-1, 1)) * scale.float().reshape(-1, 1)
    return _ungroup(deq, q.shape).to(dtype)


def int8_roundtrip(
    x: torch.Tensor, method: str = "absmax", granularity: str = "tensor", blocksize: int = 64
) -> torch.Tensor:
    """dequantize(quantize(x)) with `method` "absmax" or "zeropoint", in x's dtype."""
    _check_method(method)
    if method == "absmax":
        q, scale = quantize_absmax(x, granularity, blocksize)
        return dequantize_absmax(q, scale, granularity, blocksize, x.dtype)
    q, scale, zero_point = quantize_zeropoint(x, granularity, blocksize)
    return dequantize_zeropoint(q, scale, zero_point, granularity, blocksize, x.dtype)


def int8_error(
    x: torch.Tensor, method: str = "absmax", granularity: str = "tensor", blocksize: int = 64
) -> dict[str, float]:
    """Round-trip error: rel_mse = sum (x - x_hat)^2 / sum x^2 (0 for x = 0) and max_abs = max |x - x_hat|."""
    x_hat = int8_roundtrip(x, method, granularity, blocksize)
    x64, err = x.detach().double(), (x.detach().double() - x_hat.double())
    energy = float(x64.square().sum())
    return {"rel_mse": float(err.square().sum()) / energy if energy > 0 else 0.0,
            "max_abs": float(err.abs().max())}


# ====================================================================================================
# 2. vector-wise int8 matmul (LLM.int8(), Sec. 3.2)


def vectorwise_quant(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax int8 of every vector along `dim`: c = max_dim |x|, q = clamp(round(x * 127 / c), -127, 127).

    For X (tokens, d_in) and W (d_out, d_in) both use dim=-1, the contraction dimension of X W^T, so that
    one constant per token and one per output channel factor out of each dot product. Returns (q int8 with
    x's shape, c fp32 with `dim` removed). Like bitsandbytes, it returns the absmax c, not c / 127.
    """
    _check_float_tensor(x, "x")
    absmax = x.detach().float().abs().amax(dim=dim, keepdim=True)  # x's shape with size 1 along dim
    _check_finite(absmax, "x")
    q = (x.detach().float() * _absmax_reciprocal(absmax)).round_().clamp_(-Q_MAX, Q_MAX).to(torch.int8)
    return q, absmax.squeeze(dim)


def vectorwise_dequant(q: torch.Tensor, absmax: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Inverse of `vectorwise_quant`: x ~= q * c / 127 (c broadcast along `dim`), fp32."""
    _check_int8(q, "q")
    return q.float() * (absmax.float().unsqueeze(dim) / Q_MAX)


def int8_matmul(qx: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """C = Q_x Q_w^T exactly, int32: qx (n, d) int8, qw (m, d) int8 -> (n, m).

    The products are summed in floating point, where every partial sum is an integer: float32 is exact for
    d <= 1024 (sums below 2^24), float64 beyond. This runs on any device (integer matmul does not) and
    gives the same integers as an int8 GEMM with int32 accumulation.
    """
    _check_int8(qx, "qx")
    _check_int8(qw, "qw")
    if qx.dim() != 2 or qw.dim() != 2 or qx.shape[1] != qw.shape[1]:
        raise ValueError(f"int8_matmul: qx (n, d) and qw (m, d) must share d, got {tuple(qx.shape)} and "
                         f"{tuple(qw.shape)}")
    d = qx.shape[1]
    if d > _INT32_MAX_LEN:
        raise ValueError(f"int8_matmul: dot products of length {d} > {_INT32_MAX_LEN} can overflow int32")
    exact = torch.float32 if d <= _FP32_EXACT_LEN else torch.float64
    return (qx.to(exact) @ qw.to(exact).T).to(torch.int32)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half-precision inputs are computed in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _vectorwise_product(qx: torch.Tensor, cx: torch.Tensor, qw: torch.Tensor, cw: torch.Tensor,
                        dtype: torch.dtype) -> torch.Tensor:
    """(Q_x Q_w^T) * (c_x c_w^T) / 127^2: (n, m) in `dtype`."""
    outer = cx.to(dtype).unsqueeze(1) * cw.to(dtype).unsqueeze(0)  # (n, m)
    return int8_matmul(qx, qw).to(dtype) * outer / Q_MAX**2


def int8_matmul_vectorwise(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Y ~= (Q_x Q_w^T) * (c_x c_w^T) / 127^2 for x (..., d_in), w (d_out, d_in): (..., d_out).

    c_x is the absmax of each token (row of x), c_w of each output channel (row of w). The output is in
    float32 (float64 if an input is float64). `vectorwise_error_bound` bounds |Y - x w^T|.
    """
    _check_matmul_args(x, w)
    x2 = x.reshape(-1, x.shape[-1])  # (tokens, d_in)
    qx, cx = vectorwise_quant(x2)
    qw, cw = vectorwise_quant(w)
    y = _vectorwise_product(qx, cx, qw, cw, _compute_dtype(x, w))  # (tokens, d_out)
    return y.view(*x.shape[:-1], w.shape[0])


def vectorwise_error_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |int8_matmul_vectorwise(x, w) - x w^T|, ignoring float rounding:

    x = s_x q_x + e_x with |e_x| <= s_x / 2 (s_x = c_x / 127), likewise w, so for each output (i, j)

        |sum_k (x_ik w_jk - x^_ik w^_jk)| <= s_x,i/2 ||w_j||_1 + s_w,j/2 ||x_i||_1 + d_in s_x,i s_w,j / 4.
    """
    _check_matmul_args(x, w)
    x2 = x.detach().reshape(-1, x.shape[-1]).double()  # (tokens, d_in)
    w2 = w.detach().double()
    sx = x2.abs().amax(dim=1, keepdim=True) / Q_MAX  # (tokens, 1)
    sw = w2.abs().amax(dim=1).unsqueeze(0) / Q_MAX  # (1, d_out)
    l1_x, l1_w = x2.abs().sum(dim=1, keepdim=True), w2.abs().sum(dim=1).unsqueeze(0)
    bound = sx / 2 * l1_w + sw / 2 * l1_x + x2.shape[1] * sx * sw / 4  # (tokens, d_out)
    return bound.view(*x.shape[:-1], w.shape[0])


# ====================================================================================================
# 3. LLM.int8(): outlier decomposition (Sec. 3.3)


def outlier_columns(x: torch.Tensor, threshold: float | None = 6.0) -> torch.Tensor:
    """O = {k : |x_ik| >= threshold for some token i}: sorted int64 indices of the outlier input features.

    threshold None or 0 means no decomposition (bitsandbytes' convention): O is empty.
    """
    _check_float_tensor(x, "x")
    _check_threshold(threshold)
    if not threshold:
        return torch.empty(0, dtype=torch.long, device=x.device)
    is_outlier = (x.detach().reshape(-1, x.shape[-1]).abs() >= threshold).any(dim=0)  # (d_in,)
    return is_outlier.nonzero().view(-1)


def llm_int8_matmul(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, threshold: float | None = 6.0
) -> torch.Tensor:
    """LLM.int8(): Y = X[:, O] W[:, O]^T + int8_vectorwise(X[:, ~O], W[:, ~O]) (+ bias), O = outlier_columns.

    x (..., d_in), w (d_out, d_in) in nn.Linear layout -> (..., d_out), float32 (float64 for float64 input).
    The outlier columns are zeroed in both operands of the int8 part, so they raise neither the token
    absmax nor the channel absmax. threshold None or 0: pure vector-wise int8 (`int8_matmul_vectorwise`).
    """
    _check_matmul_args(x, w)
    dtype = _compute_dtype(x, w)
    x2 = x.reshape(-1, x.shape[-1])  # (tokens, d_in)
    cols = outlier_columns(x2, threshold)  # (k,)
    x_int, w_int = x2.index_fill(1, cols, 0), w.index_fill(1, cols, 0)
    y = int8_matmul_vectorwise(x_int, w_int)  # (tokens, d_out)
    y = y + x2[:, cols].to(dtype) @ w[:, cols].to(dtype).T  # the few outlier features in full precision
    if bias is not None:
        y = y + bias.to(dtype)
    return y.view(*x.shape[:-1], w.shape[0])


def llm_int8_matmul_quantized(
    x: torch.Tensor, w_q: torch.Tensor, w_absmax: torch.Tensor, bias: torch.Tensor | None = None,
    threshold: float | None = 6.0,
) -> torch.Tensor:
    """LLM.int8() against a weight already stored as int8 (w_q (d_out, d_in), per-row absmax (d_out,)).

    The fp32 weight is gone, so the outlier features multiply the dequantised columns w_q[:, O] * c_w / 127
    (bitsandbytes' inference path does the same), and the int8 part uses the stored codes, whose row absmax
    was taken over all columns; the only difference from `llm_int8_matmul` is that weight rounding.
    """
    _check_float_tensor(x, "x")
    _check_int8(w_q, "w_q")
    if w_q.dim() != 2 or x.shape[-1] != w_q.shape[1] or w_absmax.shape != (w_q.shape[0],):
        raise ValueError(f"llm_int8_matmul_quantized: need x (..., d_in), w_q (d_out, d_in), w_absmax (d_out,); "
                         f"got {tuple(x.shape)}, {tuple(w_q.shape)}, {tuple(w_absmax.shape)}")
    _check_finite(x.detach(), "x")
    dtype = _compute_dtype(x)
    x2 = x.reshape(-1, x.shape[-1])  # (tokens, d_in)
    cols = outlier_columns(x2, threshold)  # (k,)
    qx, cx = vectorwise_quant(x2.index_fill(1, cols, 0))
    y = _vectorwise_product(qx, cx, w_q.index_fill(1, cols, 0), w_absmax, dtype)  # (tokens, d_out)
    w_out = vectorwise_dequant(w_q[:, cols], w_absmax).to(dtype)  # (d_out, k)
    y = y + x2[:, cols].to(dtype) @ w_out.T
    if bias is not None:
        y = y + bias.to(dtype)
    return y.view(*x.shape[:-1], w_q.shape[0])


def inject_outlier(x: torch.Tensor, column: int, magnitude: float = 60.0) -> torch.Tensor:
    """A copy of x (..., d_in) whose feature `column` has |x| = magnitude in every token, signs kept.

    This imitates the systematic outlier features of large models (the same few dimensions, large in
    almost every token), which a small model does not develop.
    """
    _check_float_tensor(x, "x")
    if isinstance(column, bool) or not isinstance(column, int) or not -x.shape[-1] <= column < x.shape[-1]:
        raise ValueError(f"column must be an int index into the last dimension ({x.shape[-1]}), got {column!r}")
    if not (isinstance(magnitude, (int, float)) and 0 < magnitude < float("inf")):
        raise ValueError(f"magnitude must be a positive finite number, got {magnitude!r}")
    out = x.clone()
    sign = torch.where(out[..., column] < 0, -1.0, 1.0).to(out.dtype)
    out[..., column] = sign * magnitude
    return out


# ====================================================================================================
# 4. an int8 nn.Linear and the model swap


class Int8Linear(nn.Module):
    """nn.Linear with its weight stored as int8 codes + one fp32 absmax per output row (vector-wise).

    forward(x) = `llm_int8_matmul_quantized(x, weight_q, weight_absmax, bias, threshold)`, cast to x's dtype;
    threshold None or 0 gives pure vector-wise int8. Inference only: the buffers are not trained. After
    each forward, `last_outlier_columns` holds the outlier features found in that input.
    """

    def __init__(self, weight_q: torch.Tensor, weight_absmax: torch.Tensor, bias: torch.Tensor | None = None,
                 threshold: float | None = 6.0) -> None:
        super().__init__()
        _check_int8(weight_q, "weight_q")
        _check_threshold(threshold)
        if weight_q.dim() != 2 or weight_absmax.shape != (weight_q.shape[0],):
            raise ValueError(f"Int8Linear: weight_q must be (out, in) and weight_absmax (out,), got "
                             f"{tuple(weight_q.shape)} and {tuple(weight_absmax.shape)}")
        self.out_features, self.in_features = weight_q.shape
        self.threshold = threshold
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_absmax", weight_absmax.float())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.last_outlier_columns = torch.empty(0, dtype=torch.long)

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float | None = 6.0) -> Int8Linear:
        """Quantise `linear.weight` row-wise (`vectorwise_quant`, dim=-1); keep the bias as it is."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight_q, weight_absmax = vectorwise_quant(linear.weight.detach())
        return cls(weight_q, weight_absmax, linear.bias, threshold)

    def dequantized_weight(self) -> torch.Tensor:
        """W ~= Q_w * c_w / 127, fp32 (out, in)."""
        return vectorwise_dequant(self.weight_q, self.weight_absmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_outlier_columns = outlier_columns(x, self.threshold)  # for the lesson to print
        return llm_int8_matmul_quantized(x, self.weight_q, self.weight_absmax, self.bias, self.threshold).to(x.dtype)

    @property
    def nbytes(self) -> int:
        """Stored bytes: 1 per weight, 4 per row for the absmax, plus the bias."""
        return sum(t.numel() * t.element_size() for t in (self.weight_q, self.weight_absmax, self.bias)
                   if t is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, threshold={self.threshold}")


def quantize_linear_int8(linear: nn.Linear, threshold: float | None = 6.0) -> Int8Linear:
    """`Int8Linear.from_linear(linear, threshold)`."""
    return Int8Linear.from_linear(linear, threshold)


def quantize_model_int8(model: nn.Module, threshold: float | None = 6.0,
                        skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace every nn.Linear of `model` by an `Int8Linear`, in place, and return the model.

    Modules whose own name (last dotted part) is in `skip` stay: GPT's `lm_head` shares its weight with the
    token embedding `wte`, so quantising it would quantise the embedding too (or untie them).
    """
    _check_threshold(threshold)
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.rpartition(".")[2] not in skip]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_linear(linear, threshold))
    return model


def linear_weight_bytes(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Bytes held by the linear layers (weights, scales, biases), nn.Linear and Int8Linear alike, except `skip`."""
    total = 0
    for name, m in model.named_modules():
        if name.rpartition(".")[2] in skip:
            continue
        if isinstance(m, Int8Linear):
            total += m.nbytes
        elif isinstance(m, nn.Linear):
            total += sum(p.numel() * p.element_size() for p in (m.weight, m.bias) if p is not None)
    return total


# ====================================================================================================
# input checks


def _check_float_tensor(x: object, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")


def _check_int8(q: object, name: str) -> None:
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8:
        got = q.dtype if isinstance(q, torch.Tensor) else type(q).__name__
        raise TypeError(f"{name} must be an int8 torch.Tensor, got {got}")


def _check_finite(stat: torch.Tensor, name: str) -> None:
    # one NaN/inf would poison the scale of its whole group
    if not bool(torch.isfinite(stat).all()):
        raise ValueError(f"{name} contains NaN or infinite values; they cannot be quantised")


def _check_method(method: object) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _check_granularity(granularity: object, x: torch.Tensor, blocksize: object) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "row" and x.dim() < 2:
        raise ValueError(f"granularity='row' needs a tensor with at least 2 dimensions, got shape {tuple(x.shape)}")
    if granularity == "block" and (isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1):
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")


def _check_scale_count(scale: torch.Tensor, n_groups: int, name: str) -> None:
    if not isinstance(scale, torch.Tensor) or scale.numel() != n_groups:
        got = scale.numel() if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise ValueError(f"{name} has {got} values but the codes form {n_groups} groups")


def _check_threshold(threshold: object) -> None:
    if threshold is None:
        return
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise ValueError(f"threshold must be None or a number >= 0, got {threshold!r}")


def _check_matmul_args(x: torch.Tensor, w: torch.Tensor) -> None:
    _check_float_tensor(x, "x")
    _check_float_tensor(w, "w")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (d_out, d_in), got shape {tuple(w.shape)}")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal w's d_in ({w.shape[1]})")
    _check_finite(x.detach(), "x")  # an inf would pass as an outlier feature and come out as inf
    _check_finite(w.detach(), "w")
