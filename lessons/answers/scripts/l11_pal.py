"""Lesson 11, exercise 4: program-aided answers in small. The direct model writes "a plus b is c"; take the a and b
it wrote, compute a + b in Python, and compare with reading its c.

    python lessons/answers/scripts/l11_pal.py runs/reasoning/sft_direct
"""
import re
import sys

import torch

from minillm.runs import load_plain_run
from minillm.stages.reasoning import accuracy, chat_prompt_ids, greedy_responses, task_rows

torch.set_num_threads(1)
model, tok, _ = load_plain_run(sys.argv[1])
rows = task_rows("data/world", "addition", "test", 100)
ys = greedy_responses(model.eval(), tok, chat_prompt_ids(tok, rows), 84)
copied = pal = 0
for r, y in zip(rows, ys):
    m = re.search(r"(\d+) plus (\d+) is", y)
    if m:
        a, b = int(m[1]), int(m[2])
        copied += (a, b) == (r["a"], r["b"])
        pal += a + b == r["a"] + r["b"]
print(f"model's own answer c: {accuracy(rows, ys):.2f}; operands copied right: {copied / len(rows):.2f}; "
      f"Python's a + b right: {pal / len(rows):.2f}")
