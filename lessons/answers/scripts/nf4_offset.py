"""Lesson 8 ex 2: NF4 codes derived with other offsets delta; relative MSE (blocks of 64) on N(0,1) and on the base
run's linear weights, and the entropy of the code usage."""
import math, torch
torch.set_num_threads(1)
from minillm.quant.nf4 import derive_nf4_code, quantize_blockwise, dequantize_blockwise, NF4_OFFSET, NF4_CODE
from minillm.quant.error import gaussian_weights
from minillm.runs import load_run
from minillm.peft.apply import linear_weights
print("derive_nf4_code() == NF4_CODE:", torch.equal(derive_nf4_code(), NF4_CODE))
g = gaussian_weights(2**20)
W = list(linear_weights(load_run("/tmp/seeds_after/seed_0/base")[0]).values())
def rel_mse(ws, code, bs=64):
    num = den = 0.0
    counts = torch.zeros(16)
    for w in ws:
        q, a = quantize_blockwise(w, code, bs)
        wh = dequantize_blockwise(q, a, code, bs).view(w.shape)
        num += float((w - wh).double().square().sum()); den += float(w.double().square().sum())
        counts += torch.bincount(q.flatten().long(), minlength=16)[:16].float()
    p = counts / counts.sum(); H = -(p[p > 0] * p[p > 0].log2()).sum().item()
    return num / den, H
import os
for d in [float(x) for x in os.environ.get("DELTAS","").split(",") if x] or (0.95, NF4_OFFSET, 0.98, 0.99, 0.995):
    code = derive_nf4_code(d)
    eg, hg = rel_mse([g], code); ew, hw = rel_mse(W, code)
    print(f"delta {d:.7f}: Phi^-1(delta) {torch.special.ndtri(torch.tensor(d, dtype=torch.float64)).item():.3f}, "
          f"smallest positive code {code[code > 0].min().item():.4f}, second largest {code[-2].item():.4f} | "
          f"Gaussian rel MSE x1e-3 {1e3*eg:.3f} (entropy {hg:.3f} bits) | base weights {1e3*ew:.3f} ({hw:.3f} bits)")
# where does |w|/absmax sit in blocks of 64 of N(0,1)?
b = g.flatten().view(-1, 64); x = (b / b.abs().amax(1, keepdim=True)).abs()
print("E[absmax of 64 N(0,1)] =", b.abs().amax(1).mean().item(), " median |w|/absmax =", x.median().item())
