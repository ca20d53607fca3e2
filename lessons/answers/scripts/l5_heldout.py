"""Held-out eval of policies as the pipeline does: greedy evaluate_instructions + T=1 samples (4/prompt) gold, KL."""
import sys, json
from minillm.runs import load_plain_run
from minillm.eval.task import evaluate_instructions
from minillm.stages.dpo import reward_and_kl
recs = [json.loads(l) for l in open("/work/main/data/world/sft_test.jsonl")]
prompts = [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in recs]
sft, tok, _ = load_plain_run("/tmp/seeds_after/seed_0/sft")
for run in sys.argv[1:]:
    pol, tok, _ = load_plain_run(run)
    g = evaluate_instructions(pol.eval(), tok, recs)
    s = reward_and_kl(pol, sft, tok, prompts, n_samples=4)
    print(f"{run}: greedy gold {g['gold_reward']:.3f} EM {g['exact_match']:.3f} refusal {g['refusal_accuracy']:.3f}"
          f" | T=1 gold {s['reward']:.3f} KL {s['kl']:.3f}")
