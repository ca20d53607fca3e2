"""Test-time compute: sample several answers and pick one (lesson 11).

Three ways to turn N samples y_1 .. y_N of one prompt x into one answer:

    best-of-N            y* = y_argmax_i R(x, y_i)               a scorer R: reward model or verifier
    majority vote        a* = argmax_a sum_i [ans(y_i) = a]      self-consistency (Wang et al., 2022): the
                                                                 reasoning paths are marginalised out
    weighted vote        a* = argmax_a sum_i w_i [ans(y_i) = a]  w_i >= 0, e.g. softmax_i R(x, y_i)

ans(y) is the final answer written in y (`extract_answer`): only the answer is compared, so different
reasoning that reaches the same answer counts as agreement. Ties go to the answer seen first, so a vote is
deterministic given the samples. Prompt builders for in-context (few-shot) examples and zero-shot chain of
thought ("Let us think step by step.") are here too.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from minillm.world import final_number, final_value

__all__ = [
    "ZERO_SHOT_COT",
    "best_of_n",
    "extract_answer",
    "few_shot_messages",
    "few_shot_text",
    "majority_vote",
    "pick_best",
    "softmax_weights",
    "weighted_vote",
]

ZERO_SHOT_COT = "Let us think step by step."  # Kojima et al. (2022) append "Let's think step by step."

Sampler = Callable[[list[Any], int], list[list[str]]]  # (prompts, n) -> n responses per prompt
Scorer = Callable[[list[Any], list[str]], list[float]]  # (prompts, responses) -> one score per pair


def extract_answer(text: str, values: Sequence[str] | None = None) -> str | None:
    """The final answer written in a response: its last number ("1,225." -> "1225"), or with ``values`` the
    last word that is one of them. None when there is none."""
    if values is not None:
        return final_value(text, list(values))
    n = final_number(text)
    return None if n is None else str(n)


def _check_finite(values: Sequence[float], what: str) -> None:
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{what}: non-finite value {values[bad[0]]!r} at position {bad[0]} (a reward model "
                         f"scores NaN for text that does not fit its context); refusing to pick among them")


def majority_vote(answers: Sequence[str | None]) -> tuple[str | None, int]:
    """(the most frequent answer, its count); None answers do not vote; ties go to the one seen first.

    a* = argmax_a sum_i [ans_i = a]. (None, 0) when no sample has an answer.
    """
    answer, count = _vote(answers, [1.0] * len(answers))
    return answer, int(count)


def weighted_vote(answers: Sequence[str | None], weights: Sequence[float]) -> tuple[str | None, float]:
    """(the answer with the largest total weight, that weight): a* = argmax_a sum_i w_i [ans_i = a].

    Weights must be finite and >= 0 (use `softmax_weights` for raw reward-model scores); ties go to the
    answer seen first; None answers do not vote.
    """
    if len(weights) != len(answers):
        raise ValueError(f"weighted_vote: {len(answers)} answers but {len(weights)} weights")
    _check_finite(weights, "weighted_vote")
    if any(w < 0 for w in weights):
        raise ValueError("weighted_vote: weights must be >= 0 (turn scores into weights with softmax_weights)")
    return _vote(answers, weights)


def _vote(answers: Sequence[str | None], weights: Sequence[float]) -> tuple[str | None, float]:
    """(argmax_a sum_i w_i [ans_i = a], that sum); None answers are skipped; ties go to the answer seen first."""
    # BEGIN ASSIGNMENT majority-vote
    totals: dict[str, float] = {}  # insertion order = first appearance, which breaks ties
    for a, w in zip(answers, weights):
        if a is not None:
            totals[a] = totals.get(a, 0.0) + w
    if not totals:
        return None, 0.0
    best = max(totals, key=lambda a: totals[a])  # max keeps the first of equal keys
    return best, totals[best]
    # END ASSIGNMENT


def softmax_weights(scores: Sequence[float], temperature: float = 1.0) -> list[float]:
    """w_i = exp(s_i / t) / sum_j exp(s_j / t): scores of any sign as voting weights that sum to 1."""
    _check_finite(scores, "softmax_weights")
    if not temperature > 0:  # NaN fails too
        raise ValueError(f"temperature must be > 0, got {temperature}")
    top = max(scores)
    e = [math.exp((s - top) / temperature) for s in scores]
    return [x / sum(e) for x in e]


def pick_best(scores: Sequence[float]) -> int:
    """argmax_i s_i, the first on ties; refuses non-finite scores instead of picking a NaN silently."""
    if not scores:
        raise ValueError("pick_best: no candidates")
    _check_finite(scores, "pick_best")
    return max(range(len(scores)), key=lambda i: scores[i])


def best_of_n(prompts: list[Any], n: int, scorer: Scorer, *, sample: Sampler) -> list[tuple[str, float]]:
    """Best-of-N: for each prompt draw y_1 .. y_N with ``sample`` and keep y* = y_argmax R(x, y_i).

    sample(prompts, n) returns n responses per prompt (e.g. `minillm.stages.pairs.sample_responses` bound to a
    policy); scorer(prompts, responses) scores pairs (`gold_scorer`, `reward_model_scorer`). Returns
    (y*, R(x, y*)) per prompt. With n = 1 this is plain sampling: one call to ``sample``, no choice made.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"best_of_n: n must be an int >= 1, got {n!r}")
    candidates = sample(prompts, n)
    if len(candidates) != len(prompts) or any(len(c) != n for c in candidates):
        raise ValueError(f"best_of_n: the sampler must return {n} responses for each of {len(prompts)} prompts")
    flat_prompts = [p for p in prompts for _ in range(n)]
    flat = scorer(flat_prompts, [y for c in candidates for y in c])
    if len(flat) != n * len(prompts):
        raise ValueError(f"best_of_n: the scorer returned {len(flat)} scores for {n * len(prompts)} responses")
    out = []
    for i, c in enumerate(candidates):
        scores = list(flat[i * n:(i + 1) * n])
        try:
            j = pick_best(scores)
        except ValueError as e:
            raise ValueError(f"best_of_n: prompt {i}: {e}") from None
        out.append((c[j], scores[j]))
    return out


def few_shot_messages(examples: Sequence[tuple[str, str]], question: str, suffix: str = "") -> list[dict[str, str]]:
    """In-context learning in the chat template: k solved (question, answer) turns, then the question.

    With suffix=ZERO_SHOT_COT and no examples this is zero-shot chain of thought.
    """
    messages = []
    for q, a in examples:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    content = f"{question} {suffix}".strip()
    return messages + [{"role": "user", "content": content}]


def few_shot_text(examples: Sequence[tuple[str, str]], question: str, suffix: str = "") -> str:
    """The same for a base model, which has no chat template: "Question: q\\nAnswer: a\\n\\n" k times, then
    "Question: q\\nAnswer:" (with the suffix after "Answer:" for zero-shot chain of thought)."""
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in examples)
    return f"{shots}Question: {question}\nAnswer:" + (f" {suffix}" if suffix else "")
