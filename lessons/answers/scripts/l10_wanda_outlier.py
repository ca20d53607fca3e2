"""Lesson 10, exercise 3: magnitude vs Wanda when one input feature is an outlier.

    python lessons/answers/scripts/l10_wanda_outlier.py [BASE] [SCALE] [K]   (default runs/notebook10/base, 50, 4)

Makes an equivalent model: K features j (every 16th, from 7) of every block's ln_1 and ln_2 output are multiplied
by SCALE (LayerNorm weight and bias), and column j of the Linear that reads them (c_attn, c_fc) is divided by SCALE. The function is
the same (perplexity printed), but that column's weights are now SCALE times smaller, and its input SCALE times
larger. Then both models are pruned by magnitude and by Wanda at several sparsities.
"""
import copy
import sys

import torch

from minillm.datasets import random_windows, tokenize_corpus
from minillm.eval.perplexity import perplexity
from minillm.quant.prune import prune_model
from minillm.runs import load_run

torch.set_num_threads(1)
base, tok, _ = load_run(sys.argv[1] if len(sys.argv) > 1 else "runs/notebook10/base")
scale = float(sys.argv[2]) if len(sys.argv) > 2 else 50.0
k = int(sys.argv[3]) if len(sys.argv) > 3 else 4
base.eval()
T = base.config.block_size
train_ids = tokenize_corpus("data/world/corpus_train.txt", tok)
ev = tokenize_corpus("data/world/corpus_val.txt", tok)[:4096]
gen = torch.Generator().manual_seed(0)
calib = [random_windows(train_ids, 16, T, gen)["input_ids"] for _ in range(4)]

FEATURES = [7 + 16 * i for i in range(k)]
outlier = copy.deepcopy(base)
with torch.no_grad():
    for block in outlier.h:
        for ln, lin in ((block.ln_1, block.attn.c_attn), (block.ln_2, block.mlp.c_fc)):
            ln.weight[FEATURES] *= scale
            ln.bias[FEATURES] *= scale
            lin.weight[:, FEATURES] /= scale


def ppl(m):
    return perplexity(m, ev)["ppl"]


print(f"dense: original {ppl(base):.3f}, with {k} outlier features {FEATURES} (x{scale:g}) {ppl(outlier):.3f}")
print("| sparsity | magnitude | Wanda | magnitude, outlier model | Wanda, outlier model |")
print("|---:|---:|---:|---:|---:|")
for s in (0.3, 0.5, 0.7):
    row = []
    for model in (base, outlier):
        for method in ("magnitude", "wanda"):
            m = copy.deepcopy(model)
            prune_model(m, s, method, calibration=calib)
            row.append(ppl(m))
    print(f"| {s} | {row[0]:.2f} | {row[1]:.2f} | {row[2]:.2f} | {row[3]:.2f} |", flush=True)
