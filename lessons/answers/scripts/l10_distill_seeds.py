"""Lesson 10, section 10: the distillation modes over training seeds 0, 1, 2 (mean ± std).

    python lessons/answers/scripts/l10_distill_seeds.py runs/pipeline/sft runs/compress/student_base OUT

The teacher is the pipeline's SFT model, the student base the one `python -m minillm compress` pretrained (the
same student for every seed: only the fine-tuning seed changes). Prints each model's held-out figures per seed and
their mean ± std; writes OUT/seeds.json.
"""
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from minillm.config import DistillConfig, get_preset
from minillm.datasets import read_jsonl
from minillm.stages.distill import distill_experiment

teacher, student, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
test = [r for _, r in read_jsonl("data/world/sft_test.jsonl")]
probes = [r for _, r in read_jsonl("data/world/probes.jsonl")]
cfg = get_preset("cpu-small").distill
per_seed = {}
for seed in (0, 1, 2):
    rows = distill_experiment(teacher, student, "data/world/sft_train.jsonl", test, probes, out / str(seed),
                              replace(cfg, seed=seed), DistillConfig())
    per_seed[seed] = [{k: v for k, v in r.items() if k != "gold_rewards"} for r in rows]
out.mkdir(parents=True, exist_ok=True)
(out / "seeds.json").write_text(json.dumps(per_seed, indent=1))
for i, row in enumerate(per_seed[0]):
    for key in ("gold_reward", "exact_match", "fact_completion", "val_loss"):
        values = [per_seed[s][i][key] for s in per_seed]
        print(f"{row['model']:24s} {key:16s} {statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}  "
              f"{[round(v, 3) for v in values]}")
