"""Is multiple-choice accuracy a property of the model or of the prompt? (Llama 3, Dubey et al. 2024, Figure 14.)

The Llama 3 report measures how benchmark accuracy moves under changes that should not matter; here two
of them, in small:

Answer order. Rotate an item's K choices by k = 0..K-1 (every cyclic permutation): the choice at
original index j moves to position (j - k) mod K, so the gold letter becomes (answer - k) mod K, and a
prediction p made under rotation k names the original choice (p + k) mod K. Then

    acc_k      = accuracy under rotation k
    spread     = max_k acc_k - min_k acc_k
    consistent = (1/N) sum_i [ (pred_{i,k} + k) mod K is the same original choice for every k ]

A model that always answers "A" scores 1/K on average but is never consistent; one that knows the
answers keeps its choice wherever it is listed.

Prompt format. Accuracy of the same items under several renderings (`minillm.eval.mcq.FORMATS`: MMLU's
"A. ...", "(A) ...", "Question: ... Choices: A: ...", and scoring the choice texts), with its spread.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn as nn

from minillm.eval.mcq import evaluate_mcq, validate_item

PRED_KEY = {"acc": "pred", "acc_norm": "pred_norm", "acc_bytes": "pred_bytes"}


def rotate_choices(item: dict, k: int) -> dict:
    """The item with its choices rotated left by k: new[i] = old[(i + k) mod K], answer -> (answer - k) mod K."""
    n = len(item["choices"])
    choices = [item["choices"][(i + k) % n] for i in range(n)]
    return {**item, "choices": choices, "answer": (item["answer"] - k) % n}


def original_index(pred: int, k: int, n_choices: int) -> int:
    """Which original choice a prediction made under rotation k points to: (pred + k) mod K."""
    return (pred + k) % n_choices


def _metric_key(metric: str) -> str:
    if metric not in PRED_KEY:
        raise ValueError(f"metric must be one of {sorted(PRED_KEY)}, got {metric!r}")
    return PRED_KEY[metric]


def _spread(values: Sequence[float]) -> float:
    return max(values) - min(values)


def answer_order_robustness(
    model: nn.Module,
    tokenizer,
    items: Sequence[dict],
    fmt: str = "mmlu",
    metric: str = "acc",
    num_fewshot: int = 0,
    seed: int = 1234,
    fewshot_items: Sequence[dict] | None = None,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Accuracy under every cyclic rotation of the choices, its spread, and the consistent fraction.

    With items of different sizes, K is the largest choice count and an item of n choices is rotated by
    k mod n. Few-shot examples (from `fewshot_items`) are shown unrotated and are the same for every k.
    Returns {acc_per_rotation, mean, spread, consistent_fraction, per_item}; per_item[i]["answers"] lists
    the original choice picked under each rotation.
    """
    key = _metric_key(metric)
    for i, item in enumerate(items):
        validate_item(item, f"items[{i}]")
    if not items:
        raise ValueError("items must be a non-empty list")
    K = max(len(item["choices"]) for item in items)
    accs, answers = [], [[] for _ in items]
    for k in range(K):
        rotated = [rotate_choices(item, k) for item in items]
        result = evaluate_mcq(model, tokenizer, rotated, num_fewshot=num_fewshot, seed=seed,
                              fewshot_items=fewshot_items, fmt=fmt, batch_size=batch_size)
        accs.append(result[metric])
        for i, (item, row) in enumerate(zip(items, result["per_item"])):
            answers[i].append(original_index(row[key], k, len(item["choices"])))
    per_item = [
        {"answers": a, "consistent": len(set(a)) == 1, "answer": item["answer"]} for a, item in zip(answers, items)
    ]
    return {
        "acc_per_rotation": accs,
        "mean": sum(accs) / len(accs),
        "spread": _spread(accs),
        "consistent_fraction": sum(r["consistent"] for r in per_item) / len(per_item),
        "per_item": per_item,
    }


def prompt_format_robustness(
    model: nn.Module,
    tokenizer,
    items: Sequence[dict],
    formats: Sequence[str] = ("mmlu", "paren", "qa", "hellaswag"),
    metric: str = "acc",
    num_fewshot: int = 0,
    seed: int = 1234,
    fewshot_items: Sequence[dict] | None = None,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Accuracy of the same items under each prompt format, with the mean and spread (max - min)."""
    _metric_key(metric)
    if not formats:
        raise ValueError("formats must name at least one prompt format")
    accs = {
        fmt: evaluate_mcq(model, tokenizer, items, num_fewshot=num_fewshot, seed=seed, fewshot_items=fewshot_items,
                          fmt=fmt, batch_size=batch_size)[metric]
        for fmt in formats
    }
    values = list(accs.values())
    return {"acc_per_format": accs, "mean": sum(values) / len(values), "spread": _spread(values)}
