"""Per-kind accuracy and mean margin r_w - r_l on prefs_test for one reward run (uses whichever minillm is imported)."""
import sys, json, collections, torch
import minillm
from minillm.runs import load_reward_model
from minillm.align.preferences import read_preferences, encode_pair
from minillm.stages.reward import pair_rewards
run = sys.argv[1]
rm, tok, cfg = load_reward_model(run); rm.eval()
res = read_preferences("data/world/prefs_test.jsonl")
pairs = res[0] if isinstance(res, tuple) else getattr(res, "pairs", res)
kinds = [json.loads(l)["rejected_kind"] for l in open("data/world/prefs_test.jsonl")]
enc = [encode_pair(tok, p) for p in pairs]
rw, rl = pair_rewards(rm, enc, tok.pad_id)
by = collections.defaultdict(list)
for k, a, b in zip(kinds, rw.tolist(), rl.tolist()):
    by[k].append(a - b)
print(run, "(minillm from", minillm.__file__.split("/minillm/")[0] + ")")
for k, v in sorted(by.items()):
    print(f"  {k:20s} n={len(v):2d} acc {sum(x > 0 for x in v) / len(v):.3f} mean margin {sum(v) / len(v):7.2f} "
          f"min {min(v):7.2f}")
