"""Lesson 8 ex 1: 4-bit error and bits/param vs blocksize on the base run's linear weights."""
import torch
torch.set_num_threads(1)
from minillm.runs import load_run
from minillm.peft.apply import linear_weights
from minillm.quant.error import error_row, gaussian_weights
from minillm.quant.nf4 import quantize_4bit
base, _, _ = load_run("/tmp/seeds_after/seed_0/base")
W = linear_weights(base)
print("matrices:", {k: tuple(v.shape) for k, v in W.items()})
g = gaussian_weights(2**20)
for bs in (64, 256, 4096):
    r = error_row("base", list(W.values()), bs); rg = error_row("gauss", [g], bs)
    nbytes = {dq: sum(quantize_4bit(w, bs, "nf4", dq).nbytes for w in W.values()) for dq in (False, True)}
    n = sum(w.numel() for w in W.values())
    big = {dq: quantize_4bit(g.view(1024, 1024), bs, "nf4", dq).bits_per_param for dq in (False, True)}
    print(f"blocksize {bs:5d}: base rel MSE x1e-3 NF4 {1e3*r['nf4']:.3f} NF4+DQ {1e3*r['nf4+dq']:.3f} "
          f"FP4 {1e3*r['fp4']:.3f} int4 {1e3*r['int4']:.3f} | Gaussian NF4 {1e3*rg['nf4']:.3f} | "
          f"bits/param base {8*nbytes[False]/n:.4f} (DQ {8*nbytes[True]/n:.4f}); 1024x1024 {big[False]:.4f} "
          f"(DQ {big[True]:.4f})")
print("kurtosis of base weights", r["kurtosis"], "values", n)
