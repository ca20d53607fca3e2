"""Lesson 12, exercise 3: a label file that knows only style.

Agrees with the gold reward on the pairs whose rejected answer is rude or rambling and says 1/2 (no preference) on
every other pair, one {"prompt", "p_chosen"} line per pair of prefs_train.jsonl, in its order:

    python lessons/answers/scripts/l12_style_labels.py runs/style_labels.jsonl
    python -m minillm feedback --labels style=runs/style_labels.jsonl --labellers gold --no-cai --out runs/fb_style
"""
import sys

from minillm.stages.feedback import write_labels
from minillm.stages.judge import load_pairs

pairs = load_pairs("data/world/prefs_train.jsonl")
p = [1.0 if r["rejected_kind"] in ("rude", "rambling") else 0.5 for r in pairs]
write_labels(pairs, p, sys.argv[1])
print(f"{sys.argv[1]}: {sum(x == 1.0 for x in p)} of {len(p)} pairs labelled, the rest 1/2")
