"""Lesson 8 ex 5: bytes autograd keeps for backward in one QLoRA forward (cpu base, batch (8, 128)), with
Linear4bit's custom backward vs a naive F.linear(x, dequantize_4bit(state)) that lets autograd save W."""
import torch, torch.nn.functional as F
torch.set_num_threads(1)
from minillm.runs import load_run
from minillm.peft.apply import apply_peft
from minillm.peft import qlora
from minillm.quant.nf4 import dequantize_4bit

def saved_bytes(model, idx):
    seen = {}
    def pack(t):
        seen[t.data_ptr()] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(idx).float().logsumexp(-1).mean()
    loss.backward()
    return sum(seen.values())

base, _, _ = load_run("/tmp/seeds_after/seed_0/base")
idx = torch.randint(0, 1024, (8, 128), generator=torch.Generator().manual_seed(0))
m = apply_peft(base, "qlora")
a = saved_bytes(m, idx)
orig = qlora._DequantizeLinear.apply
qlora._DequantizeLinear.apply = staticmethod(lambda x, state, bias: F.linear(x, dequantize_4bit(state, x.dtype), bias))
b = saved_bytes(m, idx)
qlora._DequantizeLinear.apply = orig
lin = sum(mod.in_features * mod.out_features for mod in m.modules() if isinstance(mod, qlora.Linear4bit))
print(f"saved for backward: Linear4bit {a/2**20:.3f} MiB, naive {b/2**20:.3f} MiB, difference {(b-a)/2**20:.3f} MiB; "
      f"fp32 linear weights {4*lin/2**20:.3f} MiB ({lin:,} values)")
