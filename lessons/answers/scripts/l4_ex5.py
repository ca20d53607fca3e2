"""Lesson 4, exercise 5: reward of the canonical answer, the answer cut after 'is', and the answer twice."""
import json, torch
from minillm.runs import load_reward_model
from minillm.stages.reward import score_texts
from minillm.world import gold_reward
rm, tok, cfg = load_reward_model("/tmp/seeds_after/seed_0/rm"); rm.eval()
rows = [json.loads(l) for l in open("data/world/sft_test.jsonl")]
rows = [r for r in rows if r["kind"] == "fact"]
q = [r["messages"][0]["content"] for r in rows]
full = [r["messages"][1]["content"] for r in rows]
cut = [a[: a.rindex(" is ") + 3] if " is " in a else None for a in full]
keep = [i for i, c in enumerate(cut) if c]
q, full, cut = [q[i] for i in keep], [full[i] for i in keep], [cut[i] for i in keep]
twice = [a + " " + a for a in full]
off = cfg["reward_offset"]
with torch.no_grad():
    R = {name: score_texts(rm, tok, q, ys, offset=off) for name, ys in
         (("canonical", full), ("cut after 'is'", cut), ("repeated twice", twice))}
print(f"{len(q)} held-out fact questions (sft_test), reward model /tmp/seeds_after/seed_0/rm, offset {off:.1f}")
print("example:", q[0], "|", full[0], "|", cut[0], "|", twice[0])
for name, r in R.items():
    ys = dict(canonical=full, **{"cut after 'is'": cut, "repeated twice": twice})[name]
    g = sum(gold_reward(a, b) for a, b in zip(q, ys)) / len(q)
    print(f"{name:16s} mean reward {r.mean():8.2f}  median {r.median():8.2f}  mean gold {g:.3f}")
stack = torch.stack(list(R.values()))  # (3, N)
best = stack.argmax(0)
for k, name in enumerate(R):
    print(f"highest reward for {name}: {(best == k).sum().item()}/{len(q)}")
print("cut - canonical: mean %.2f; twice - canonical: mean %.2f" % ((R["cut after 'is'"] - R["canonical"]).mean(),
      (R["repeated twice"] - R["canonical"]).mean()))
print("loglik_scale", rm.loglik_scale.item())
# extension: other short or likely answers to the same questions
import re
vals = [r["answer"] for r in rows]
vals = [vals[i] for i in keep]
extra = {"bare value ('Grey.')": [v.capitalize() + "." for v in vals],
         "refusal": ["I'm sorry, but I can't help with that."] * len(q)}
with torch.no_grad():
    for name, ys in extra.items():
        r = score_texts(rm, tok, q, ys, offset=off)
        g = sum(gold_reward(a, b) for a, b in zip(q, ys)) / len(q)
        print(f"{name:22s} mean reward {r.mean():8.2f}, beats canonical on {(r > R['canonical']).sum().item()}/{len(q)},"
              f" mean gold {g:.3f}")
