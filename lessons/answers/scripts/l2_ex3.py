"""Lesson 2, exercise 3: 16 bytes/parameter for the gpu preset vs minillm.memory on real tensors."""
import torch
from minillm.config import get_preset
from minillm.model import GPT
from minillm.memory import training_memory
from minillm.train import configure_optimizer
torch.set_num_threads(1)
p = get_preset("gpu"); cfg = p.model; cfg.vocab_size = p.vocab_size
model = GPT(cfg)
n = sum(t.numel() for t in model.parameters())
print(f"parameters (tied wte counted once): {n:,}")
print(f"16 B/param estimate: {16 * n:,} B = {16 * n / 2**30:.3f} GiB")
print("predicted (no grads yet, AdamW state predicted):", {k: v for k, v in training_memory(model).items()})
opt = configure_optimizer(model, p.pretrain)
x = torch.randint(0, cfg.vocab_size, (1, 8))
loss = torch.nn.functional.cross_entropy(model(x).view(-1, cfg.vocab_size), x.view(-1))
loss.backward(); opt.step()
m = training_memory(model, opt)
print("measured after one AdamW step:", m)
print(f"total {m['total']:,} B = {m['total'] / 2**30:.3f} GiB; minus estimate: {m['total'] - 16 * n:,} B")
