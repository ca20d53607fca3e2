"""Lesson 3, exercise 1: how does an SFT model trained without <|end|> in the mask stop?"""
import json, sys, collections
from minillm.runs import load_run
from minillm.sampling import generate_completions
from minillm.eval.task import evaluate_instructions
recs = [json.loads(l) for l in open("/work/main/data/world/sft_test.jsonl")]
for run in sys.argv[1:]:
    model, tok, _ = load_run(run); model.eval()
    prompts = [tok.apply_chat_template(r["messages"][:1], add_generation_prompt=True)[0] for r in recs]
    # no eos: see what follows the answer; 48 new tokens
    outs = generate_completions(model, prompts, 48, eos_id=None, temperature=0)
    ends = [o.index(tok.end_id) if tok.end_id in o else None for o in outs]
    n_end = sum(e is not None for e in ends)
    first = collections.Counter(tok.decode(o[len(tok.encode(r["messages"][1]["content"])):][:1]) for o, r in zip(outs, recs))
    print(f"== {run}: {n_end}/{len(recs)} answers emit <|end|> within 48 tokens")
    print("   token right after the reference answer's length:", first.most_common(5))
    for o in outs[:3]:
        print("  ", repr(tok.decode(o)))
    m = evaluate_instructions(model, tok, recs)
    print("   evaluate_instructions:", {k: round(v, 3) for k, v in m.items() if isinstance(v, float)})
