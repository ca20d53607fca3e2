"""LoftQ: quantisation-aware initialisation of LoRA for a 4-bit base (Li et al., 2023, "LoftQ").

QLoRA starts from deq(Q) + B A with B = 0, so the model begins with the full quantisation error
W - deq(Q). LoftQ instead chooses Q and the LoRA factors together, alternating (Algorithm 1):

    A_0 B_0 = 0
    Q_t          = quant(W - s B_{t-1} A_{t-1})          (NF4, as in QLoRA)
    s B_t A_t    = SVD_r(W - deq(Q_t))                   (best rank-r approximation of the residual)

so that ||W - (deq(Q_T) + s B_T A_T)||_F <= ||W - deq(quant(W))||_F (QLoRA's error). With T = 1 the
quantised weight equals QLoRA's and B A absorbs the top-r part of its error.

Scaling convention: the LoRA layer adds s B A (s = lora_alpha / r). We split the rank-r
approximation U_r S_r V_r^T symmetrically and divide by the scaling:
B = U_r sqrt(S_r) / sqrt(s), A = sqrt(S_r) V_r^T / sqrt(s), so s B A is exactly the approximation
(PEFT's LoftQ split is the same with s = 1).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from minillm.peft.lora import LoRALinear, lora_scaling
from minillm.peft.qlora import Linear4bit
from minillm.quant.nf4 import QuantState4bit, dequantize_4bit, quantize_4bit

__all__ = ["low_rank_factors", "loftq_init", "loftq_linear"]


def low_rank_factors(residual: torch.Tensor, r: int, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with scaling * B A = U_r S_r V_r^T, the best rank-r approximation of `residual` (Eckart-Young).

    A: (r, in) = sqrt(S_r) V_r^T / sqrt(scaling),  B: (out, r) = U_r sqrt(S_r) / sqrt(scaling).
    """
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)  # (out, k), (k,), (k, in)
    root = (S[:r] / scaling).sqrt()
    return root.unsqueeze(1) * Vh[:r], U[:, :r] * root


def loftq_init(
    W: torch.Tensor,
    r: int,
    num_iters: int = 1,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    scaling: float = 1.0,
) -> tuple[QuantState4bit, torch.Tensor, torch.Tensor]:
    """LoftQ's alternating quantisation / rank-r SVD (Algorithm 1) for a (out, in) weight W.

    Returns (Q, lora_A, lora_B) with W ~= dequant(Q) + scaling * lora_B @ lora_A; lora_A (r, in),
    lora_B (out, r) in W's dtype. The SVD runs in fp32 (fp64 if W is fp64).
    """
    if not isinstance(W, torch.Tensor) or not W.is_floating_point() or W.dim() != 2:
        raise ValueError(f"loftq_init: W must be a 2-D floating tensor, got {getattr(W, 'shape', type(W))}")
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(W.shape):
        raise ValueError(f"loftq_init: r must be an integer in [1, min(W.shape) = {min(W.shape)}], got {r!r}")
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"loftq_init: num_iters must be a positive integer, got {num_iters!r}")
    if not scaling > 0:
        raise ValueError(f"loftq_init: scaling must be positive, got {scaling!r}")
    W = W.detach()
    work = torch.float64 if W.dtype == torch.float64 else torch.float32
    W32 = W.to(work)
    low_rank = torch.zeros_like(W32)  # s B_0 A_0 = 0
    for _ in range(num_iters):
        Q = quantize_4bit((W32 - low_rank).to(W.dtype), blocksize, quant_type, double_quant)
        A, B = low_rank_factors(W32 - dequantize_4bit(Q, work), r, scaling)
        low_rank = scaling * (B @ A)
    return Q, A.to(W.dtype), B.to(W.dtype)


def loftq_linear(
    linear: nn.Linear,
    r: int = 8,
    lora_alpha: float = 8,
    num_iters: int = 1,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> LoRALinear:
    """A QLoRA layer initialised by LoftQ: base = Linear4bit(Q), lora_A, lora_B from `loftq_init`."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"loftq_linear: expected an nn.Linear, got {type(linear).__name__}")
    scaling = lora_scaling(r, lora_alpha, use_rslora)
    Q, A, B = loftq_init(linear.weight, r, num_iters, quant_type, blocksize, double_quant, scaling)
    base = Linear4bit.from_quant_state(Q, linear.bias, compute_dtype)
    layer = LoRALinear(base, r, lora_alpha, lora_dropout, use_rslora)
    with torch.no_grad():
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
    return layer
