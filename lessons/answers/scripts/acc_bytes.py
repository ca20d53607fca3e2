"""Lesson 9 ex 2: items where acc and acc_bytes disagree but acc and acc_norm agree. On the world items (ASCII)
chars == bytes, so it cannot happen; with accented distractors (é, ö, ü: 1 character, 2 UTF-8 bytes) it can."""
import json, torch
torch.set_num_threads(1)
from minillm.eval.mcq import choose, evaluate_mcq, load_mcq
from minillm.runs import load_run
print("hand-made:", choose([-4.0, -6.3], ["Oslo", "Zürich"]), "(pred, pred_norm, pred_bytes)")
model, tok, _ = load_run("/tmp/seeds_after/seed_0/base")
acc = str.maketrans({"e": "é", "o": "ö", "u": "ü", "a": "ä"})
for split, mode in (("test", "distractors"), ("dev", "distractors"), ("test", "all"), ("dev", "all")):
    items = load_mcq(f"data/world/mcq_{split}.jsonl")
    accented = [{**it, "choices": [c if (i == it["answer"] and mode == "distractors") else c.translate(acc)
                                   for i, c in enumerate(it["choices"])]} for it in items]
    rep = evaluate_mcq(model, tok, accented, fmt="hellaswag")
    hits = [(it, r) for it, r in zip(accented, rep["per_item"])
            if r["pred"] == r["pred_norm"] and r["pred"] != r["pred_bytes"]]
    print(f"{split}: {len(items)} items, accented {mode}, acc {rep['acc']:.3f} acc_norm {rep['acc_norm']:.3f} "
          f"acc_bytes {rep['acc_bytes']:.3f}; pred == pred_norm != pred_bytes on {len(hits)} items")
    for it, r in hits[:2]:
        print("  ", r["context"][-40:], [(c, round(ll, 2), len(c), len(c.encode())) for c, ll in zip(it["choices"], r["lls"])],
              "gold", it["answer"], "pred", r["pred"], "pred_norm", r["pred_norm"], "pred_bytes", r["pred_bytes"])
