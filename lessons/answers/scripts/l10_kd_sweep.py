"""Lesson 10, exercise 2: the notebook's tiny distillation at several temperatures and alphas.

    python lessons/answers/scripts/l10_kd_sweep.py [BASE]      (BASE: a pretrained run, default runs/notebook10/base)

Teacher: BASE, frozen. Student: 1 layer, width 32, from scratch; 200 AdamW steps (lr 3e-3) of 16 windows of
64 tokens, either fresh windows or a 64-window transfer set. Prints the validation loss at step 200 and the best.
"""
import sys

import torch
import torch.nn.functional as F

from minillm.align.distill import kd_loss, mix_loss
from minillm.datasets import random_windows, tokenize_corpus
from minillm.model import GPT, GPTConfig
from minillm.runs import load_run

torch.set_num_threads(1)
base, tok, _ = load_run(sys.argv[1] if len(sys.argv) > 1 else "runs/notebook10/base")
base.eval().requires_grad_(False)
TD = min(base.config.block_size, 64)
train_ids = tokenize_corpus("data/world/corpus_train.txt", tok)
val_ids = tokenize_corpus("data/world/corpus_val.txt", tok)
val_gen = torch.Generator().manual_seed(1)
val_batches = [random_windows(val_ids, 32, TD, val_gen) for _ in range(4)]
pool = random_windows(train_ids, 64, TD, torch.Generator().manual_seed(5))


@torch.no_grad()
def val_loss(model):
    return sum(float(F.cross_entropy(model(b["input_ids"]).flatten(0, 1), b["targets"].flatten()))
               for b in val_batches) / len(val_batches)


def run(alpha, temp, small, steps=200):
    torch.manual_seed(0)
    s = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=TD, n_layer=1, n_head=2, n_embd=32))
    opt = torch.optim.AdamW(s.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(1, steps + 1):
        if small:
            i = torch.randint(0, 64, (16,), generator=g)
            b = {"input_ids": pool["input_ids"][i], "targets": pool["targets"][i]}
        else:
            b = random_windows(train_ids, 16, TD, g)
        logits = s(b["input_ids"])
        ce = F.cross_entropy(logits.flatten(0, 1), b["targets"].flatten())
        loss = mix_loss(kd_loss(logits, base(b["input_ids"]), None, temp), ce, alpha) if alpha > 0 else ce
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0:
            losses.append(val_loss(s))
    return losses[-1], min(losses)


print(f"teacher validation loss {val_loss(base):.3f}")
print("| data | alpha | T | val loss @200 | best |")
print("|---|---:|---:|---:|---:|")
for small in (False, True):
    for alpha, temp in ((0.0, 1.0), (1.0, 1.0), (1.0, 2.0), (1.0, 4.0), (0.5, 1.0), (0.5, 2.0), (0.5, 4.0)):
        last, best = run(alpha, temp, small)
        print(f"| {'transfer set' if small else 'fresh'} | {alpha} | {temp:g} | {last:.3f} | {best:.3f} |", flush=True)
