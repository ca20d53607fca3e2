"""Lesson 1, exercise 3: generate() time without (and with) the KV cache for 64, 128, 256 new tokens."""
import sys, time, torch
from minillm.config import get_preset
from minillm.model import GPT
from minillm.sampling import generate
from minillm.runs import load_run

torch.set_num_threads(1)
torch.manual_seed(0)

def bench(model, label):
    prompt = torch.randint(0, model.config.vocab_size, (1, 8))
    generate(model, prompt, 8, temperature=0)  # warm-up
    print(f"{label}: n_layer {model.config.n_layer}, n_embd {model.config.n_embd}, block {model.config.block_size}")
    prev = None
    for n in (64, 128, 256):
        row = {}
        for use_cache in (False, True):
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                generate(model, prompt, n, temperature=0, use_cache=use_cache)
                best = min(best, time.perf_counter() - t0)
            row[use_cache] = best
        ratio = "" if prev is None else f"  (x{row[False] / prev:.2f} vs previous n)"
        prev = row[False]
        print(f"  {n:4d} new tokens: no cache {row[False]:.3f} s{ratio}; cache {row[True]:.3f} s")

p = get_preset("cpu")
cfg = p.model; cfg.vocab_size = p.vocab_size; cfg.block_size = 8 + 256
bench(GPT(cfg).eval(), "cpu-preset shape, random weights, block raised to 264 (no window sliding)")
model, _, _ = load_run("/tmp/seeds_after/seed_0/base")
bench(model.eval(), "trained /tmp/seeds_after/seed_0/base (block 128: past 120 new tokens the window slides)")
