"""Lesson 11, exercise 3: hold out a *range* of first operands (500-599) instead of a set of values, train the
scratchpad model on the rest, and compare held-out accuracy with fresh sums from the training range.

    python lessons/answers/scripts/l11_range.py runs/pipeline/base out_dir     (about 3 minutes at the cpu preset)
"""
import json
import random
import sys
from pathlib import Path

import torch

from minillm.config import SFTConfig, get_preset
from minillm.stages.reasoning import accuracy, chat_prompt_ids, greedy_responses, write_format_chats
from minillm.stages.sft import run_sft
from minillm.world import addition_scratchpad, math_answer

torch.set_num_threads(2)
base, out = sys.argv[1], Path(sys.argv[2])
rng = random.Random(0)


def row(a, b):
    q = f"What is {a} plus {b}?"
    return {"question": q, "direct": math_answer(a, b), "cot": addition_scratchpad(a, b), "answer": str(a + b),
            "kind": "addition", "a": a, "b": b}


def sums(n, first_ok, seen):
    rows = []
    while len(rows) < n:
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        if first_ok(a) and (a, b) not in seen:
            seen.add((a, b))
            rows.append(row(a, b))
    return rows


seen = set()
train = sums(2000, lambda a: not 500 <= a <= 599, seen)
in_range = sums(100, lambda a: not 500 <= a <= 599, seen)
held_range = sums(100, lambda a: 500 <= a <= 599, seen)
two_hop = [json.loads(x) for x in Path("data/world/two_hop_train.jsonl").read_text().splitlines()]
chats = write_format_chats(train + two_hop, "cot", out / "cot_range_train.jsonl")
run = run_sft(base, chats, out / "sft_cot_range", get_preset("cpu").reasoning, SFTConfig(), progress=False)
model, tok = run.model.eval(), run.tokenizer
for name, rows in (("fresh sums, first operand outside 500-599", in_range), ("first operand 500-599", held_range)):
    ys = greedy_responses(model, tok, chat_prompt_ids(tok, rows), 84)
    spelled = sum(y.split(".")[0] == r["cot"].split(".")[0] for r, y in zip(rows, ys)) / len(rows)
    print(f"{name}: accuracy {accuracy(rows, ys):.2f}, operands spelled right {spelled:.2f}; e.g. {ys[0][:40]!r}")
