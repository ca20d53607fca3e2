"""peft-compare with custom specs (what `peft-compare --peft-arg` would do if it existed).

Usage: python peft_variants.py OUT NAME=JSON_SPEC [NAME=JSON_SPEC ...]   (JSON null = full fine-tuning)
Same pipeline as `compare.compare_methods`: cpu preset sft TrainConfig, PEFT lr = 20 x, the four chat-token rows
trained, score_run (exact match on sft_test), adapter.pt bytes, forward slowdown on a (4, 128 - max P) batch.
"""
import json, os, sys
from functools import partial
import torch
torch.set_num_threads(1)
from minillm.config import get_preset
from minillm.stages import compare

out, items = sys.argv[1], sys.argv[2:]
specs = {}
for it in items:
    name, _, js = it.partition("=")
    specs[name] = json.loads(js)
cfg = get_preset("cpu").sft
setup = compare.prepare("/tmp/seeds_after/seed_0/base", "data/world/sft_test.jsonl", None, not os.environ.get("NOCHAT"))  # NOCHAT=1: no chat-token rows
virtual = max((s or {}).get("num_virtual_tokens", 0) for s in specs.values())
gen = torch.Generator().manual_seed(0)
idx = torch.randint(0, setup.base.config.vocab_size, (4, setup.base.config.block_size - virtual), generator=gen)
measure = partial(compare.adapter_bytes_and_slowdowns, base=setup.base, timing_idx=idx, repeats=5, seconds=3.0,
                  keep_checkpoint=True)
rows = compare.run_methods("variants", setup, list(specs), specs, "data/world/sft_train.jsonl", out, cfg,
                           measure=measure, progress=False)
for r in rows:
    r["exact_match_vs_full"] = None
    r["adapter_bytes"] = r["adapter_bytes"]
print(compare.render_table(rows))
json.dump(rows, open(f"{out}/rows.json", "w"), indent=1, default=str)
