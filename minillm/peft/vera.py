"""VeRA: vector-based random matrix adaptation (Kopiczko, Blankevoort & Asano, 2024).

One pair of random matrices is drawn once from a seed, frozen, and shared by every adapted layer; each
layer trains only two scaling vectors:

    y = W x + b + lambda_b * ( B_l ( lambda_d * ( A_l dropout(x) ) ) )

    A: (r, max_in), B: (max_out, r)   shared, frozen; A_l = A[:, :in], B_l = B[:out, :]
    lambda_d: (r,) = d_initial (0.1),  lambda_b: (out,) = 0   per layer, trained

As in Hugging Face PEFT, A and B are sized by the largest targeted in/out dimensions, drawn on the CPU from
`torch.Generator().manual_seed(projection_seed)`, A first then B, each uniform(-bound, bound) with the
kaiming bound for gain sqrt(2): bound = sqrt(6 / fan_in) (fan_in = max_in for A, r for B). So the seed
alone reproduces them: only the seed and the vectors need saving, (out + r) numbers per layer.
lambda_b = 0 makes the update zero at the start. Delta W = diag(lambda_b) B_l diag(lambda_d) A_l is mergeable.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from minillm.peft.lora import (
    adapter_dtype, check_linear_like, check_not_merged_when_disabled, merge_weight, unmerge_weight,
)


def kaiming_uniform_gain_sqrt2(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-bound, bound) with bound = sqrt(2) * sqrt(3 / fan_in) = sqrt(6 / fan_in); fan_in = shape[1]."""
    bound = math.sqrt(2.0) * math.sqrt(3.0 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjections(nn.Module):
    """The shared frozen pair vera_A (r, max_in), vera_B (max_out, r), regenerated from `projection_seed`.

    Buffers, not parameters, and not in the state dict (non-persistent): the seed stands for them.
    """

    def __init__(
        self,
        r: int,
        max_in: int,
        max_out: int,
        projection_seed: int = 0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"VeRA: r must be a positive integer, got {r!r}")
        if not isinstance(projection_seed, int) or isinstance(projection_seed, bool):
            raise TypeError(f"VeRA: projection_seed must be an int, got {projection_seed!r}")
        self.r, self.max_in, self.max_out, self.projection_seed = r, max_in, max_out, projection_seed
        generator = torch.Generator(device="cpu").manual_seed(projection_seed)
        vera_A = kaiming_uniform_gain_sqrt2((r, max_in), generator)  # drawn first
        vera_B = kaiming_uniform_gain_sqrt2((max_out, r), generator)
        self.register_buffer("vera_A", vera_A.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("vera_B", vera_B.to(device=device, dtype=dtype), persistent=False)

    def extra_repr(self) -> str:
        return f"r={self.r}, max_in={self.max_in}, max_out={self.max_out}, projection_seed={self.projection_seed}"


class VeRALinear(nn.Module):
    """A frozen `base` plus lambda_b * (B_l (lambda_d * (A_l x))) with the shared `projections`."""

    def __init__(
        self,
        base: nn.Module,
        projections: VeRAProjections,
        d_initial: float = 0.1,
        vera_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = check_linear_like(base, "VeRALinear")
        if projections.max_in < self.in_features or projections.max_out < self.out_features:
            raise ValueError(
                f"VeRALinear: shared projections (max_in={projections.max_in}, max_out={projections.max_out}) "
                f"are smaller than this layer (in={self.in_features}, out={self.out_features})"
            )
        if not 0.0 <= vera_dropout < 1.0:
            raise ValueError(f"VeRA: vera_dropout must be in [0, 1), got {vera_dropout}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.projections = projections  # the same module object in every layer: shared, not copied
        device, dtype = base.weight.device, adapter_dtype(base)
        self.lambda_d = nn.Parameter(torch.full((projections.r,), float(d_initial), device=device, dtype=dtype))
        self.lambda_b = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype))
        self.dropout = nn.Dropout(vera_dropout) if vera_dropout > 0 else nn.Identity()
        self.disabled = False

    @property
    def vera_A(self) -> torch.Tensor:
        """A_l = vera_A[:, :in_features], a view of the shared matrix, (r, in)."""
        return self.projections.vera_A[:, : self.in_features]

    @property
    def vera_B(self) -> torch.Tensor:
        """B_l = vera_B[:out_features, :], a view of the shared matrix, (out, r)."""
        return self.projections.vera_B[: self.out_features, :]

    @property
    def merged(self) -> bool:
        return getattr(self, "unmerged_weight", None) is not None

    def delta_weight(self) -> torch.Tensor:
        """Delta W = diag(lambda_b) B_l diag(lambda_d) A_l, shape (out, in)."""
        return (self.lambda_b[:, None] * self.vera_B) @ (self.lambda_d[:, None] * self.vera_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = base(x) + lambda_b * (B_l (lambda_d * (A_l dropout(x)))); base(x) alone when disabled or merged."""
        result = self.base(x)
        if self.disabled:
            check_not_merged_when_disabled(self)
            return result
        if self.merged:
            return result
        h = self.dropout(x.to(self.lambda_d.dtype)) @ self.vera_A.T  # (..., r)
        update = self.lambda_b * ((self.lambda_d * h) @ self.vera_B.T)  # (..., out)
        return result + update.to(result.dtype)

    def merge(self) -> None:
        """W <- W + Delta W; idempotent."""
        if self.merged:
            return
        merge_weight(self, self.delta_weight, "VeRALinear")

    def unmerge(self) -> None:
        """Restore the exact pre-merge weight."""
        unmerge_weight(self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.projections.r}"
