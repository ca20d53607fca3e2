"""LLM-as-judge: a language model grades answers, and the biases that come with it (lesson 12).

Pairwise: the judge reads a question and two answers in the slots {a} and {b} of a template and is asked
which is better. Its preference is read from the log-probabilities of the two verdict tokens, not from a
sampled reply:

    p(A | x, a, b) = exp ll("A") / (exp ll("A") + exp ll("B"))          one order
    P(a > b)       = ( p(A | x, a, b) + p(B | x, b, a) ) / 2             both orders averaged

Averaging both orders makes the verdict symmetric, P(a > b) = 1 - P(b > a), whatever the judge's taste for a
position; the position bias itself is measured by how often the judge picks the same *slot* in both orders
(`position_bias`; 1.0 for a judge that always says "A"). Single-answer grading reads p("Yes") against p("No").
Agreement with a reference (the world's gold reward, or humans) is the share of pairs where both prefer the same
answer, and Cohen's kappa corrects it for the agreement two coin flips would reach.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from minillm.eval.loglik import score_continuations

__all__ = [
    "PAIRWISE_TEMPLATE",
    "SINGLE_TEMPLATE",
    "agreement",
    "check_template",
    "cohen_kappa",
    "length_preference",
    "pairwise_preferences",
    "position_bias",
    "single_scores",
    "verdict_probability",
]

PAIRWISE_TEMPLATE = "Question: {question}\nAnswer A: {a}\nAnswer B: {b}\nWhich answer is better, A or B?"
SINGLE_TEMPLATE = "Question: {question}\nAnswer: {answer}\nIs this a good answer, Yes or No?"


def check_template(template: str, slots: Sequence[str]) -> None:
    """A judge template must contain every slot ({question} and {a}/{b}, or {answer}) exactly once."""
    missing = [s for s in slots if template.count("{" + s + "}") != 1]
    if missing:
        raise ValueError(f"judge template must contain each of {['{' + s + '}' for s in slots]} exactly once; "
                         f"check {['{' + s + '}' for s in missing]} in {template!r}")


def _prompt_ids(tok, text: str, chat: bool) -> list[int]:
    """The judging prompt, in the chat template (a chat model) or as plain text ending in "Verdict:"."""
    if chat:
        return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)[0]
    return tok.encode(text + "\nVerdict:")


def verdict_probability(model: nn.Module, tok, prompts: list[list[int]], first: str, second: str,
                        chat: bool = True) -> list[float]:
    """p(first) / (p(first) + p(second)) for the verdict tokens after each prompt (ids)."""
    lead = "" if chat else " "  # a chat answer starts right after the header; plain text after "Verdict:"
    a_ids, b_ids = tok.encode(lead + first), tok.encode(lead + second)
    scores = score_continuations(model, [(p, ids) for p in prompts for ids in (a_ids, b_ids)])
    out = []
    for i in range(len(prompts)):
        la, lb = scores[2 * i][0], scores[2 * i + 1][0]
        top = max(la, lb)
        out.append(math.exp(la - top) / (math.exp(la - top) + math.exp(lb - top)))
    return out


def pairwise_preferences(model: nn.Module, tok, questions: Sequence[str], answers_a: Sequence[str],
                         answers_b: Sequence[str], template: str = PAIRWISE_TEMPLATE, chat: bool = True
                         ) -> dict[str, list[float]]:
    """The judge's preference for answer a over answer b in each pair, both orders.

    Returns {"a_first": p(A | a in slot A), "b_first": p(A | b in slot A), "preference": P(a > b)} with
    P(a > b) = (a_first + 1 - b_first) / 2, the order-averaged verdict.
    """
    check_template(template, ("question", "a", "b"))
    if not len(questions) == len(answers_a) == len(answers_b):
        raise ValueError(f"pairwise_preferences: {len(questions)} questions, {len(answers_a)} answers a, "
                         f"{len(answers_b)} answers b")
    first = [_prompt_ids(tok, template.format(question=q, a=a, b=b), chat)
             for q, a, b in zip(questions, answers_a, answers_b)]
    swapped = [_prompt_ids(tok, template.format(question=q, a=b, b=a), chat)
               for q, a, b in zip(questions, answers_a, answers_b)]
    a_first = verdict_probability(model, tok, first, "A", "B", chat)
    b_first = verdict_probability(model, tok, swapped, "A", "B", chat)
    return {"a_first": a_first, "b_first": b_first,
            "preference": [(x + 1.0 - y) / 2 for x, y in zip(a_first, b_first)]}


def single_scores(model: nn.Module, tok, questions: Sequence[str], answers: Sequence[str],
                  template: str = SINGLE_TEMPLATE, chat: bool = True) -> list[float]:
    """Single-answer grading: p("Yes") / (p("Yes") + p("No")) for each (question, answer)."""
    check_template(template, ("question", "answer"))
    prompts = [_prompt_ids(tok, template.format(question=q, answer=a), chat) for q, a in zip(questions, answers)]
    return verdict_probability(model, tok, prompts, "Yes", "No", chat)


def position_bias(a_first: Sequence[float], b_first: Sequence[float]) -> float:
    """Share of pairs whose verdict picks the same slot in both orders (so it follows the slot, not the answer).

    A pair is inconsistent when p(A) > 1/2 in both orders or < 1/2 in both: 0 for a judge that only reads the
    answers, 1.0 for one that always says "A".
    """
    if len(a_first) != len(b_first) or not a_first:
        raise ValueError("position_bias: need the same number (> 0) of verdicts in both orders")
    same = sum((x > 0.5) == (y > 0.5) for x, y in zip(a_first, b_first))
    return same / len(a_first)


def agreement(judge: Sequence[float], reference: Sequence[float]) -> float:
    """Share of pairs where judge and reference prefer the same answer (each given as P(a > b); > 1/2 means a)."""
    if len(judge) != len(reference) or not judge:
        raise ValueError("agreement: need the same number (> 0) of judge and reference preferences")
    return sum((j > 0.5) == (r > 0.5) for j, r in zip(judge, reference)) / len(judge)


def cohen_kappa(judge: Sequence[float], reference: Sequence[float]) -> float:
    """kappa = (p_o - p_e) / (1 - p_e): observed agreement p_o corrected by the chance agreement
    p_e = q_j q_r + (1 - q_j)(1 - q_r), with q the share of pairs each side decides for answer a."""
    p_o = agreement(judge, reference)
    q_j = sum(j > 0.5 for j in judge) / len(judge)
    q_r = sum(r > 0.5 for r in reference) / len(reference)
    p_e = q_j * q_r + (1 - q_j) * (1 - q_r)
    return 1.0 if p_e == 1.0 else (p_o - p_e) / (1 - p_e)


def length_preference(preference: Sequence[float], answers_a: Sequence[str], answers_b: Sequence[str]) -> float:
    """Verbosity bias: share of pairs (with answers of different word counts) where the judge prefers the longer."""
    pairs = [(p, len(a.split()) > len(b.split())) for p, a, b in zip(preference, answers_a, answers_b)
             if len(a.split()) != len(b.split())]
    if not pairs:
        raise ValueError("length_preference: every pair has answers of the same length")
    return sum((p > 0.5) == a_longer for p, a_longer in pairs) / len(pairs)
