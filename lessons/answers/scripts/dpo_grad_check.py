import torch
from minillm.align.dpo import dpo_loss
torch.manual_seed(0)
beta = 0.1
pw, pl, rw, rl = (torch.randn(5, dtype=torch.float64) * 10 for _ in range(4))
pw.requires_grad_(); pl.requires_grad_()
loss, r_w, r_l = dpo_loss(pw, pl, rw, rl, beta=beta)
loss.sum().backward()
w = torch.sigmoid(r_l - r_w)
print((pw.grad + beta * w).abs().max().item(), (pl.grad - beta * w).abs().max().item())
