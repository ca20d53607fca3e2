"""Exact match / refusals / gold reward on sft_test, trainable params, last val loss and train seconds of SFT runs."""
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from minillm.runs import load_run
from minillm.peft.apply import count_parameters
from minillm.eval.task import evaluate_instructions
records = [json.loads(l) for l in open("data/world/sft_test.jsonl")]
for run in sys.argv[1:]:
    m, tok, cfg = load_run(run)
    ev = evaluate_instructions(m, tok, records)
    rows = [json.loads(l) for l in open(Path(run) / "metrics.jsonl")]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    print(json.dumps({"run": run, "peft": cfg.get("peft"), "trainable": count_parameters(m)[0],
                      "val_loss": round(val[-1], 4) if val else None, "exact": round(ev["exact_match"], 3),
                      "refusal": ev["refusal_accuracy"], "gold": round(ev["gold_reward"], 3)}))
