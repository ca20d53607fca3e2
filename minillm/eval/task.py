"""Task-level evaluation on the world: does the model know the facts?

Fact completion (after pretraining): for every probe "Mira lives in" -> "Oakvale" in a phrasing the corpus
never used, greedy-decode a few tokens and count the probe correct when the completion starts with the answer:

    accuracy = (1/N) sum_i [ normalize(greedy(prompt_i)) starts with normalize(answer_i) ]
"""
from __future__ import annotations

import re
from typing import Any

from minillm.model import GPT
from minillm.sampling import generate_completions


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def completion_matches(completion: str, answer: str) -> bool:
    """True when the completion's first words are the answer's words (case and punctuation ignored)."""
    want = _words(answer)
    return bool(want) and _words(completion)[: len(want)] == want


def fact_completion_accuracy(model: GPT, tokenizer, probes: list[dict[str, Any]], max_new_tokens: int = 6,
                             batch_size: int = 64) -> dict[str, Any]:
    """Greedy fact completion on probes ({prompt, answer, attribute, ...}); overall and per-attribute accuracy."""
    if not probes:
        raise ValueError("fact_completion_accuracy: no probes")
    prompts = [tokenizer.encode(p["prompt"]) for p in probes]
    outs = generate_completions(model, prompts, max_new_tokens, eos_id=tokenizer.eot_id, temperature=0,
                                batch_size=batch_size)
    rows = []
    for p, ids in zip(probes, outs):
        completion = tokenizer.decode(ids)
        rows.append({**p, "completion": completion, "correct": completion_matches(completion, p["answer"])})
    by_attr: dict[str, list[bool]] = {}
    for r in rows:
        by_attr.setdefault(str(r.get("attribute", "all")), []).append(r["correct"])
    return {
        "accuracy": sum(r["correct"] for r in rows) / len(rows),
        "n": len(rows),
        "per_attribute": {k: sum(v) / len(v) for k, v in sorted(by_attr.items())},
        "rows": rows,
    }
