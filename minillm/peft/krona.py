"""KronA: Kronecker-product adaptation of a frozen linear layer (Edalati et al., 2022).

The update is the Kronecker product of two small trained factors, in parallel to the frozen weight:

    y = W x + b + s * (A kron B) x          A: (a1, a2),  B: (b1, b2),  a1 * b1 = out,  a2 * b2 = in

Unlike LoRA's rank-r update, A kron B can have full rank (rank(A) * rank(B)) with only a1 a2 + b1 b2
parameters. The (out, in) matrix is never built: with x reshaped row-major to X (..., a2, b2),

    (A kron B) x = vec_row(A X B^T)                                   # (..., a1, b1) -> (..., out)

which costs O(a1 a2 b2 + a1 b2 b1) per token instead of O(out * in).

Factor shapes default to the divisor pairs closest to the square roots (PEFT LoKr's `factorization`:
48 -> (6, 8), 16 -> (4, 4)), the smaller divisor going to A. As in PEFT LoKr's default init, A starts at
zero and B kaiming-uniform(a=sqrt(5)), so the model starts unchanged and B still receives gradient
through A. The update is mergeable: W' = W + s * kron(A, B).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from minillm.peft.lora import (
    adapter_dtype, check_linear_like, check_not_merged_when_disabled, merge_weight, unmerge_weight,
)


def factorization(dimension: int) -> tuple[int, int]:
    """(m, n) with m * n = dimension, m <= n and m the largest divisor not above sqrt(dimension)."""
    if not isinstance(dimension, int) or dimension < 1:
        raise ValueError(f"factorization: dimension must be a positive integer, got {dimension!r}")
    m = max(d for d in range(1, math.isqrt(dimension) + 1) if dimension % d == 0)
    return m, dimension // m


def kron_shapes(
    in_features: int,
    out_features: int,
    a_shape: tuple[int, int] | None = None,
    b_shape: tuple[int, int] | None = None,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """((a1, a2), (b1, b2)) with a1 * b1 = out and a2 * b2 = in; a missing shape follows from the other."""
    if a_shape is None and b_shape is None:
        (a1, b1), (a2, b2) = factorization(out_features), factorization(in_features)
        return (a1, a2), (b1, b2)
    for name, shape in (("a_shape", a_shape), ("b_shape", b_shape)):
        if shape is not None and (len(shape) != 2 or any(not isinstance(n, int) or n < 1 for n in shape)):
            raise ValueError(f"KronA: {name} must be two positive integers, got {shape!r}")
    if a_shape is None:
        a_shape = (_divide(out_features, b_shape[0], "out_features", "b_shape[0]"),
                   _divide(in_features, b_shape[1], "in_features", "b_shape[1]"))
    if b_shape is None:
        b_shape = (_divide(out_features, a_shape[0], "out_features", "a_shape[0]"),
                   _divide(in_features, a_shape[1], "in_features", "a_shape[1]"))
    if a_shape[0] * b_shape[0] != out_features or a_shape[1] * b_shape[1] != in_features:
        raise ValueError(
            f"KronA: a_shape {tuple(a_shape)} and b_shape {tuple(b_shape)} give a "
            f"({a_shape[0] * b_shape[0]}, {a_shape[1] * b_shape[1]}) product, the layer is "
            f"(out={out_features}, in={in_features})"
        )
    return tuple(a_shape), tuple(b_shape)


def _divide(dim: int, factor: int, dim_name: str, factor_name: str) -> int:
    if dim % factor != 0:
        raise ValueError(f"KronA: {factor_name}={factor} does not divide {dim_name}={dim}")
    return dim // factor


def kron_matvec(A: torch.Tensor, B: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(A kron B) x for every row of x (..., a2 * b2), without building A kron B. Returns (..., a1 * b1)."""
    a1, a2 = A.shape
    b1, b2 = B.shape
    X = x.reshape(*x.shape[:-1], a2, b2)  # (..., a2, b2), row-major
    Y = A @ X @ B.T  # (a1, a2) @ (..., a2, b2) @ (b2, b1) -> (..., a1, b1)
    return Y.reshape(*x.shape[:-1], a1 * b1)  # (..., out)


class KronALinear(nn.Module):
    """A frozen `base` plus s * (krona_A kron krona_B) x, computed by the reshape identity."""

    def __init__(
        self,
        base: nn.Module,
        a_shape: tuple[int, int] | None = None,
        b_shape: tuple[int, int] | None = None,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = check_linear_like(base, "KronALinear")
        (a1, a2), (b1, b2) = kron_shapes(self.in_features, self.out_features, a_shape, b_shape)
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.scale = float(scale)
        device, dtype = base.weight.device, adapter_dtype(base)
        self.krona_A = nn.Parameter(torch.zeros(a1, a2, device=device, dtype=dtype))  # zero: start unchanged
        self.krona_B = nn.Parameter(torch.empty(b1, b2, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.krona_B, a=math.sqrt(5))
        self.disabled = False

    @property
    def merged(self) -> bool:
        return getattr(self, "unmerged_weight", None) is not None

    def delta_weight(self) -> torch.Tensor:
        """Delta W = s * kron(A, B), (out, in): built only for merging."""
        return torch.kron(self.krona_A, self.krona_B) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = base(x) + s (A kron B) x by the reshape identity; base(x) alone when disabled or merged."""
        result = self.base(x)
        if self.disabled:
            check_not_merged_when_disabled(self)
            return result
        if self.merged:
            return result
        update = kron_matvec(self.krona_A, self.krona_B, x.to(self.krona_A.dtype)) * self.scale
        return result + update.to(result.dtype)

    def merge(self) -> None:
        """W <- W + s kron(A, B); idempotent."""
        if self.merged:
            return
        merge_weight(self, self.delta_weight, "KronALinear")

    def unmerge(self) -> None:
        """Restore the exact pre-merge weight."""
        unmerge_weight(self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"A={tuple(self.krona_A.shape)}, B={tuple(self.krona_B.shape)}, scale={self.scale:g}")
