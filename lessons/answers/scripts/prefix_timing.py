"""Lesson 7 ex 4: forward slowdown of prefix tuning with P = 10, 50, 100 (untrained prefixes: the cost does
not depend on the values), with compare.forward_seconds (CPU time, round-robin, best of many calls), 1 thread."""
import copy, torch
torch.set_num_threads(1)
from minillm.runs import load_run
from minillm.peft.apply import apply_peft, count_parameters
from minillm.stages.compare import forward_seconds
base, tok, _ = load_run("/tmp/seeds_after/seed_0/base")
models = {"base": base}
for P in (10, 50, 100):
    m = apply_peft(copy.deepcopy(base), "prefix", num_virtual_tokens=P)
    models[f"P={P}"] = m
    print(f"P={P}: trainable {count_parameters(m)[0]:,}, context left for real tokens {m.config.block_size}")
gen = torch.Generator().manual_seed(0)
for B, T in ((4, 28), (4, 16), (32, 28)):
    idx = torch.randint(0, base.config.vocab_size, (B, T), generator=gen)
    t = forward_seconds(models, idx, repeats=20, budget_seconds=6.0)
    print(f"input ({B}, {T}):", ", ".join(f"{k} {v*1e3:.3f} ms ({v / t['base']:.2f}x)" for k, v in t.items()))
