"""Lesson 10, exercise 4: forward time of dense vs 50% unstructured vs 2:4 vs structured (50% heads and neurons).

    python lessons/answers/scripts/l10_speed.py [BASE]       (default runs/notebook10/base)

Times model(x) for x = 32 windows of block_size tokens, one thread, alternating the models over 7 trials;
prints the median time relative to the dense model and the multiply-adds of the block Linears per token.
"""
import copy
import sys
import time

import torch

from minillm.datasets import random_windows, tokenize_corpus
from minillm.quant.prune import block_linears, prune_model, prune_structured
from minillm.runs import load_run

torch.set_num_threads(1)
base, tok, _ = load_run(sys.argv[1] if len(sys.argv) > 1 else "runs/notebook10/base")
base.eval()
T = base.config.block_size
ids = tokenize_corpus("data/world/corpus_train.txt", tok)
gen = torch.Generator().manual_seed(0)
calib = [random_windows(ids, 16, T, gen)["input_ids"] for _ in range(4)]
x = ids[: 32 * T].view(32, T)

models = {"dense": base}
models["unstructured 50%"] = copy.deepcopy(base)
prune_model(models["unstructured 50%"], 0.5, "magnitude")
models["2:4"] = copy.deepcopy(base)
prune_model(models["2:4"], None, "magnitude", nm=(2, 4))
models["structured 50%"] = copy.deepcopy(base)
prune_structured(models["structured 50%"], 0.5, 0.5, calib)


@torch.no_grad()
def seconds(model, n=20):
    model(x)
    t = time.perf_counter()
    for _ in range(n):
        model(x)
    return (time.perf_counter() - t) / n


times = {name: [] for name in models}
for _ in range(7):
    for name, m in models.items():
        times[name].append(seconds(m))
dense = sorted(times["dense"])[3]
print("| model | block-Linear MACs / token (dense math) | nonzero weights | median time / dense |")
print("|---|---:|---:|---:|")
for name, m in models.items():
    lin = block_linears(m).values()
    macs = sum(l.weight.numel() for l in lin)
    nonzero = sum(int((l.weight != 0).sum()) for l in lin)
    print(f"| {name} | {macs:,} | {nonzero:,} | {sorted(times[name])[3] / dense:.2f} |")
