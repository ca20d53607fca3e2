"""Lesson 2, exercise 2: fact completion (probes.jsonl, greedy) of tiny runs after 100, 300, 1000 steps."""
import json, collections
from minillm.runs import load_run
from minillm.eval.task import fact_completion_accuracy
rows = [json.loads(l) for l in open("data/world/probes.jsonl")]
# majority baseline: always answer the most common answer of the attribute
by = collections.defaultdict(collections.Counter)
for r in rows: by[r["attribute"]][r["answer"]] += 1
print("majority-answer baseline:", round(sum(c.most_common(1)[0][1] for c in by.values()) / len(rows), 3))
for n in (100, 300, 1000):
    model, tok, _ = load_run(f"/tmp/ans/l2_tiny{n}")
    f = fact_completion_accuracy(model.eval(), tok, rows)
    val = [json.loads(l) for l in open(f"/tmp/ans/l2_tiny{n}/metrics.jsonl")]
    vl = [r["val_loss"] for r in val if "val_loss" in r][-1]
    print(f"tiny {n:4d} steps: val loss {vl:.3f}, fact completion {f['accuracy']:.3f} (n={f['n']}),",
          {k: round(v, 2) for k, v in f["per_attribute"].items()})
    print("   e.g.", [(r["prompt"], r["answer"], r["completion"].strip()) for r in f["rows"][:3]])
