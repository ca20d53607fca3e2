"""Lesson 10, exercise 6: GPTQ's gain over RTN as a function of the correlation rho between two inputs.

    python lessons/answers/scripts/l10_gptq_corr.py

A (256, 2) weight with inputs x1, x2 ~ N(0, 1), corr(x1, x2) = rho (100,000 samples). After rounding column 1
(a 3-bit grid per row), GPTQ moves column 2 by rho * delta_1 before rounding it. Prints the output error
||X W^T - X W_q^T||^2 / ||X W^T||^2 of RTN and of GPTQ (no damping, one group per row), and the error left
after the update of column 2 but before rounding it, against (1 - rho^2) times column 1's error alone.
"""
import torch

from minillm.quant.gptq import gptq_quantize, layer_reconstruction_error, rtn_quantize

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
W = torch.randn(256, 2, generator=g, dtype=torch.float64)
z = torch.randn(100_000, 2, generator=g, dtype=torch.float64)
print("| rho | RTN | GPTQ | RTN / GPTQ | after the update (before rounding col 2) | (1 - rho^2) x col-1 error |")
print("|---:|---:|---:|---:|---:|---:|")
for rho in (0.0, 0.5, 0.9, 0.99):
    X = torch.stack([z[:, 0], rho * z[:, 0] + (1 - rho**2) ** 0.5 * z[:, 1]], dim=1)   # (n, 2)
    rtn = rtn_quantize(W, bits=3, group_size=None)
    gq = gptq_quantize(W, X, bits=3, group_size=None, percdamp=0.0, block_size=2)
    e_rtn = layer_reconstruction_error(W, rtn.weight, X)
    e_gptq = layer_reconstruction_error(W, gq.weight, X)
    # by hand: column 1 rounded on GPTQ's grid, column 2 moved by rho * delta_1 (H = [[1, rho], [rho, 1]])
    delta1 = W[:, 0] - gq.weight[:, 0]
    w_mid = torch.stack([gq.weight[:, 0], W[:, 1] + rho * delta1], dim=1)
    only1 = torch.stack([gq.weight[:, 0], W[:, 1]], dim=1)
    e_mid = layer_reconstruction_error(W, w_mid, X)
    e_only1 = layer_reconstruction_error(W, only1, X)
    print(f"| {rho} | {e_rtn:.3e} | {e_gptq:.3e} | {e_rtn / e_gptq:.2f} | {e_mid:.3e} | {(1 - rho**2) * e_only1:.3e} |")
