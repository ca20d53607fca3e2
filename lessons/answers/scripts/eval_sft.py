"""evaluate_instructions on data/world/sft_test.jsonl for each run given."""
import json, sys
from minillm.runs import load_run
from minillm.eval.task import evaluate_instructions
recs = [json.loads(l) for l in open("/work/main/data/world/sft_test.jsonl")]
for run in sys.argv[1:]:
    model, tok, _ = load_run(run)
    m = evaluate_instructions(model.eval(), tok, recs)
    print(run, {k: round(v, 3) for k, v in m.items() if isinstance(v, float)})
