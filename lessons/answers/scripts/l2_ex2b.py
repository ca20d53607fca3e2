"""Share of completions that name *some* valid value of the asked attribute (right type, maybe wrong fact)."""
import json, collections
from minillm.runs import load_run
from minillm.eval.task import fact_completion_accuracy
rows = [json.loads(l) for l in open("data/world/probes.jsonl")]
vals = collections.defaultdict(set)
for r in rows: vals[r["attribute"]].add(r["answer"].lower())
for n in (100, 300, 1000):
    model, tok, _ = load_run(f"/tmp/ans/l2_tiny{n}")
    f = fact_completion_accuracy(model.eval(), tok, rows)
    typed = sum(any(v in r["completion"].lower().split(".")[0] for v in vals[r["attribute"]]) for r in f["rows"])
    print(f"tiny {n}: right type {typed / len(rows):.3f}, right fact {f['accuracy']:.3f}")
