"""Usage: python dpo_measure.py SFT_RUN RUN [RUN ...]
For each DPO run: last logged rewards/margins (train, val), eval.json (prefs_test) accuracy and margin,
reward_and_kl vs the SFT model on the 66 sft_test prompts, 4 samples each at T=1 (as pipeline.heldout_eval),
and greedy gold reward / exact match (evaluate_instructions)."""
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from minillm.runs import load_plain_run
from minillm.stages.dpo import reward_and_kl
from minillm.eval.task import evaluate_instructions

sft_dir, runs = sys.argv[1], sys.argv[2:]
records = [json.loads(l) for l in open("data/world/sft_test.jsonl")]
prompts = [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in records]
sft, tok, _ = load_plain_run(sft_dir)
for run in runs:
    rows = [json.loads(l) for l in open(Path(run) / "metrics.jsonl")]
    last = rows[-1]
    ev = json.loads((Path(run) / "eval.json").read_text()) if (Path(run) / "eval.json").exists() else {}
    pol, _, _ = load_plain_run(run)
    rk = reward_and_kl(pol, sft, tok, prompts, n_samples=4)
    gi = evaluate_instructions(pol, tok, records)
    print(json.dumps({"run": run, "step": last["step"], "train_margin": last.get("rewards/margins"),
                      "val_margin": last.get("val_rewards/margins"), "test_acc": ev.get("rewards/accuracies"),
                      "test_margin": ev.get("rewards/margins"), "kl": round(rk["kl"], 4),
                      "sampled_gold": round(rk["reward"], 4), "resp_tokens": round(rk["response_tokens"], 2),
                      "greedy_gold": round(gi["gold_reward"], 4), "exact": round(gi["exact_match"], 4)}))
