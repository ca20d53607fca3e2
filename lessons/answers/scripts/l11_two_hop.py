"""Lesson 11, exercise 5: which hop fails? Greedy worked answers of a CoT model to the held-out two-hop questions.

    python lessons/answers/scripts/l11_two_hop.py runs/reasoning/sft_cot
"""
import sys

import torch

from minillm.runs import load_plain_run
from minillm.stages.reasoning import chat_prompt_ids, greedy_responses, task_rows
from minillm.world import check_answer, make_world

torch.set_num_threads(1)
world = make_world(0)
model, tok, _ = load_plain_run(sys.argv[1])
for split in ("train", "test"):
    rows = task_rows("data/world", "two_hop", split, 64)
    ys = greedy_responses(model.eval(), tok, chat_prompt_ids(tok, rows), 84)
    hop1 = [y.split(".")[0].split()[-1] == r["character"] for r, y in zip(rows, ys)]
    right = [bool(check_answer(r["question"], y, world)) for r, y in zip(rows, ys)]
    named_train = sum(y.split(".")[0].split()[-1] in world.train_names for y in ys)
    print(f"{split}: first hop right {sum(hop1) / len(rows):.2f}; answer right {sum(right) / len(rows):.2f}; "
          f"answer right when the first hop is {sum(a and b for a, b in zip(hop1, right)) / max(sum(hop1), 1):.2f}; "
          f"names a training character {named_train / len(rows):.2f}; e.g. {ys[0]!r}")
