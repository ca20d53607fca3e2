"""How much each 4-bit type loses: NF4, NF4 + double quantisation, FP4 and int4 on the same weights.

For each weight matrix W, quantise -> dequantise (`minillm.quant.nf4.quantization_error`, blocks of 64, one
absmax each) and report the relative error

    rel_mse = sum_W sum_i (w_i - deq(quant(w))_i)^2 / sum_W sum_i w_i^2

beside the weights' excess kurtosis E[(w - mu)^4] / sigma^4 - 3 (0 for a Gaussian; large values mean
outliers, which stretch a block's absmax and waste codes). NF4's codes are quantiles of N(0, 1), so it
should beat FP4 and the int4 absmax baseline on Gaussian weights, and on trained weights as long as they
stay close to Gaussian.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from minillm.quant.nf4 import quantization_error

# Columns of the error table: name -> (quant_type, double_quant) for `quantization_error`.
QUANT_COLUMNS: dict[str, tuple[str, bool]] = {
    "nf4": ("nf4", False), "nf4+dq": ("nf4", True), "fp4": ("fp4", False), "int4": ("int4", False),
}


def gaussian_weights(numel: int = 2**20, seed: int = 0) -> torch.Tensor:
    """numel draws of N(0, 1) as a (numel / 1024, 1024) matrix: the weights NF4 is designed for."""
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 1024 or numel % 1024:
        raise ValueError(f"gaussian_weights: numel must be a positive multiple of 1024, got {numel!r}")
    return torch.randn(numel // 1024, 1024, generator=torch.Generator().manual_seed(seed))


def excess_kurtosis(w: torch.Tensor) -> float:
    """E[(w - mu)^4] / sigma^4 - 3: 0 for a Gaussian, large when a few weights are outliers."""
    x = w.detach().double().flatten()
    z = (x - x.mean()) / x.std(correction=0)
    return float(z.pow(4).mean() - 3.0)


def error_row(name: str, weights: Sequence[torch.Tensor], blocksize: int = 64) -> dict[str, Any]:
    """Relative error of each 4-bit type on `weights` taken together (each matrix quantised on its own,
    blocks of `blocksize`), plus the largest absolute error and the excess kurtosis of all the values."""
    if not weights:
        raise ValueError(f"error_row({name!r}): no weights")
    numel = sum(w.numel() for w in weights)
    energy = sum(float(w.double().square().sum()) for w in weights)
    row: dict[str, Any] = {"name": name, "numel": numel,
                           "kurtosis": excess_kurtosis(torch.cat([w.detach().flatten() for w in weights]))}
    for column, (quant_type, double_quant) in QUANT_COLUMNS.items():
        errors = [quantization_error(w, quant_type, blocksize, double_quant) for w in weights]
        row[column] = sum(e["mse"] * w.numel() for e, w in zip(errors, weights)) / energy
        row[column + "_max_abs"] = max(e["max_abs"] for e in errors)
    return row


def quantization_error_table(weights: Mapping[str, torch.Tensor] | None = None, blocksize: int = 64,
                             gaussian_numel: int = 2**20, seed: int = 0) -> list[dict[str, Any]]:
    """Rows: Gaussian weights, then (if given) all the named `weights` of a trained model together and each
    kind of layer across the blocks ("h.3.attn.c_attn" and "h.0.attn.c_attn" are both "attn.c_attn")."""
    rows = [error_row("Gaussian N(0, 1)", [gaussian_weights(gaussian_numel, seed)], blocksize)]
    if weights:
        rows.append(error_row("trained model: every linear weight", list(weights.values()), blocksize))
        kinds: dict[str, list[torch.Tensor]] = {}
        for name, w in weights.items():
            kinds.setdefault(".".join(name.split(".")[-2:]), []).append(w)
        rows += [error_row(f"trained model: {kind}", ws, blocksize) for kind, ws in kinds.items()]
    return rows


def render_error_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: relative MSE (x 1e-3) per 4-bit type, and NF4's error as a fraction of int4's."""
    lines = ["| weights | values | excess kurtosis | NF4 | NF4 + DQ | FP4 | int4 | NF4 / int4 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['numel']:,} | {r['kurtosis']:.2f} | {1e3 * r['nf4']:.3f} | "
                     f"{1e3 * r['nf4+dq']:.3f} | {1e3 * r['fp4']:.3f} | {1e3 * r['int4']:.3f} | "
                     f"{r['nf4'] / r['int4']:.2f} |")
    return "\n".join(lines)
