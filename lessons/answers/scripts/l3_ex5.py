"""Lesson 3, exercise 5: base model (seed_0) with 0, 1, 3, 8 shots vs the SFT model; exact match and right_form."""
import json, re
from minillm.runs import load_run
from minillm.eval.task import evaluate_instructions, fewshot_prompt
from minillm.world import make_world
read = lambda p: [json.loads(l) for l in open(p)]
test, train = read("data/world/sft_test.jsonl"), read("data/world/sft_train.jsonl")
world = make_world(0)
names = {w.lower() for w in [c.name for c in world.characters] + world.towns + world.jobs + world.pets
         + world.fruits + world.colours}
def form(t):  # the notebook's right_form: names/values -> W, numbers -> #
    return " ".join("#" if x.isdigit() else "W" if x.lower() in names else x.lower()
                    for x in re.findall(r"[A-Za-z]+|[0-9]+|[^\sA-Za-z0-9]", t))
right_form = lambda rows: sum(form(r["answer"]) == form(r["reference"]) for r in rows) / len(rows)
base, tok, _ = load_run("/tmp/seeds_after/seed_0/base"); base.eval()
facts = [r for r in train if r["kind"] == "fact"]
for k in (0, 1, 3, 8):
    shots = facts[:k]
    L = len(tok.encode(fewshot_prompt(test[1]["messages"][0]["content"], shots)))
    r = evaluate_instructions(base, tok, test, mode="fewshot", shots=shots)
    print(f"base {k}-shot (prompt {L} tokens): EM {r['exact_match']:.3f}, refusal {r['refusal_accuracy']:.3f}, "
          f"gold {r['gold_reward']:.3f}, right_form {right_form(r['rows']):.3f}; e.g. {r['rows'][1]['answer']!r}")
sft, tok, _ = load_run("/tmp/seeds_after/seed_0/sft"); sft.eval()
r = evaluate_instructions(sft, tok, test)
print(f"SFT chat: EM {r['exact_match']:.3f}, refusal {r['refusal_accuracy']:.3f}, gold {r['gold_reward']:.3f}, "
      f"right_form {right_form(r['rows']):.3f}")
print("'?' in corpus:", "?" in open("data/world/corpus_train.txt").read(), "; newline-free docs?",
      open("data/world/corpus_train.txt").read().count("\n"))
