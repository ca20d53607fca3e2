"""Constitutional AI in small (Bai et al. 2022): written principles critique, revise and label the model's answers.

A constitution is a short list of principles, one per line of a text file (`data/constitution.txt`):

    polite: The answer is polite and never insults the person asking.

Every step below asks a *judge* model (the SFT model itself, or one fine-tuned from it on a few verdicts) a question
whose answer is read from the log-probabilities of two verdict tokens (`minillm.eval.judge`), never from sampled
text:

    critique_k(x, y) = p("Yes" | Principle c_k, Question x, Answer y, "Does the answer follow the principle?")
    k*               = argmin_k critique_k                                         the principle broken most
    y'               = the model's reply to [x, y, "Rewrite your answer so that it follows: c_k*"]   the revision,
                       asked when critique_k* < 1/2 and kept when P_CAI(y' > y) > 1/2 (below); optionally the
                       best of y' and a few fresh samples (see `critique_revise`)
    P_CAI(a > b)     = (1/K) sum_k P_k(a > b)          P_k: the order-averaged pairwise verdict under principle c_k

Supervised CAI fine-tunes on the final answers (SL-CAI); the AI labeller P_CAI turns pairs of the SL-CAI model's
samples into preference pairs for RL (here DPO; RL-CAI). Bai et al. sample one principle per comparison and let
the feedback model write its critique in words; a model of a few hundred thousand parameters cannot write a
useful critique, so ours reads the verdict's probability for every principle and averages, which also makes the
whole loop deterministic when the answers are decoded at temperature 0. Keeping a revision only when the
constitution prefers it to the first answer is our choice: a small model's revision is often worse than its first
answer, and the verdict that decides costs a few forward passes.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from minillm.eval.judge import pairwise_preferences, single_scores
from minillm.sampling import generate_completions

__all__ = [
    "CRITIQUE_TEMPLATE",
    "PAIRWISE_PRINCIPLE_TEMPLATE",
    "REVISION_REQUEST",
    "Principle",
    "answer",
    "constitution_preferences",
    "critique",
    "critique_revise",
    "parse_constitution",
    "read_constitution",
    "with_principle",
]

CRITIQUE_TEMPLATE = ("Principle: {principle}\nQuestion: {question}\nAnswer: {answer}\n"
                     "Does the answer follow the principle, Yes or No?")
PAIRWISE_PRINCIPLE_TEMPLATE = ("Principle: {principle}\nQuestion: {question}\nAnswer A: {a}\nAnswer B: {b}\n"
                               "Which answer follows the principle better, A or B?")
REVISION_REQUEST = "Rewrite your answer so that it follows this principle: {principle}"
_NAME = re.compile(r"[a-z][a-z0-9_-]*")


@dataclass(frozen=True)
class Principle:
    """One rule of the constitution: a short name (for tables) and the sentence the judge reads."""

    name: str
    text: str


def parse_constitution(text: str, source: str = "<constitution>") -> list[Principle]:
    """Principles from lines `name: sentence`; blank lines and lines starting with # are skipped.

    A malformed line (no colon, a name that is not lower-case letters, digits, - or _, an empty sentence, a brace,
    a repeated name) is refused as `source:line: reason`, and so is a file without a principle.
    """
    principles: list[Principle] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{lineno}"
        name, colon, sentence = line.partition(":")
        name, sentence = name.strip(), sentence.strip()
        if not colon:
            raise ValueError(f"{where}: expected 'name: principle', got {line!r}")
        if not _NAME.fullmatch(name):
            raise ValueError(f"{where}: principle name {name!r} must be lower-case letters, digits, - or _")
        if not sentence:
            raise ValueError(f"{where}: principle {name!r} has no text after the colon")
        if "{" in sentence or "}" in sentence:
            raise ValueError(f"{where}: principle {name!r} may not contain braces (it is pasted into a template)")
        if any(p.name == name for p in principles):
            raise ValueError(f"{where}: principle {name!r} is defined twice")
        principles.append(Principle(name, sentence))
    if not principles:
        raise ValueError(f"{source}: the constitution has no principles (lines 'name: principle')")
    return principles


def read_constitution(path: str | os.PathLike) -> list[Principle]:
    """`parse_constitution` of a UTF-8 text file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: constitution file not found")
    return parse_constitution(path.read_text(encoding="utf-8"), str(path))


def with_principle(template: str, principle: Principle) -> str:
    """The template with {principle} filled in and its other slots left for the judge functions."""
    return template.replace("{principle}", principle.text)


def critique(judge: nn.Module, tok, questions: Sequence[str], answers: Sequence[str],
             principles: Sequence[Principle]) -> list[dict[str, float]]:
    """critique_k(x, y) = p("Yes") under CRITIQUE_TEMPLATE with principle c_k, as {principle name: p} per answer."""
    per_principle = {p.name: single_scores(judge, tok, questions, answers, with_principle(CRITIQUE_TEMPLATE, p))
                     for p in principles}
    return [{name: scores[i] for name, scores in per_principle.items()} for i in range(len(answers))]


def answer(model: nn.Module, tok, conversations: Sequence[list[dict[str, str]]], max_new_tokens: int = 48,
           temperature: float = 0.0, seed: int = 0) -> list[str]:
    """The model's next assistant turn for each conversation (greedy at temperature 0), stripped."""
    device = next(model.parameters()).device
    ids = [tok.apply_chat_template(c, add_generation_prompt=True)[0] for c in conversations]
    gen = torch.Generator(device=device).manual_seed(seed)
    outs = generate_completions(model, ids, max_new_tokens, eos_id=tok.end_id, temperature=temperature,
                                generator=gen)
    return [tok.decode(o).strip() for o in outs]


def critique_revise(model: nn.Module, judge: nn.Module, tok, questions: Sequence[str],
                    principles: Sequence[Principle], max_new_tokens: int = 48, temperature: float = 0.0,
                    samples: int = 0, seed: int = 0) -> list[dict]:
    """One round of critique -> revision for each question (see the module docstring).

    The answer and the rewrite are decoded at `temperature` (greedy at 0). With `samples` > 0 the model also
    offers that many fresh answers at temperature 1 (seeded): a model too small to follow the rewrite request can
    still have a better answer of its own (rejection sampling under the constitution). The revision is the
    candidate the constitution prefers most to the first answer, P_CAI(y' > y), kept when that is above 1/2
    (pairwise verdicts are better calibrated than single-answer scores; lesson 12 measures both). Returns per
    question {question, initial, critique, principle (the one broken most, or None), revision (None when nothing
    was broken), source ("rewrite" or "sample"), p_better, revised (the revision was kept), final}.
    """
    model.eval()
    asked = [[{"role": "user", "content": q}] for q in questions]
    initial = answer(model, tok, asked, max_new_tokens, temperature, seed)
    crit = critique(judge, tok, questions, initial, principles)
    by_name = {p.name: p for p in principles}
    worst = [min(c, key=c.get) for c in crit]
    todo = [i for i, (c, w) in enumerate(zip(crit, worst)) if c[w] < 0.5]
    # candidates[i]: (source, text) pairs for each question whose answer broke a principle
    candidates: dict[int, list[tuple[str, str]]] = {i: [] for i in todo}
    if todo:
        conversations = [asked[i] + [{"role": "assistant", "content": initial[i]},
                                     {"role": "user", "content": REVISION_REQUEST.format(
                                         principle=by_name[worst[i]].text)}] for i in todo]
        for i, text in zip(todo, answer(model, tok, conversations, max_new_tokens, temperature, seed + 1)):
            candidates[i].append(("rewrite", text))
        for k in range(samples):
            fresh = answer(model, tok, [asked[i] for i in todo], max_new_tokens, 1.0, seed + 2 + k)
            for i, text in zip(todo, fresh):
                candidates[i].append(("sample", text))
    flat = [(i, src, text) for i in todo for src, text in candidates[i] if text and text != initial[i]]
    wins = constitution_preferences(judge, tok, [questions[i] for i, _, _ in flat], [t for _, _, t in flat],
                                    [initial[i] for i, _, _ in flat], principles)["preference"] if flat else []
    best: dict[int, tuple[float, str, str]] = {}
    for (i, src, text), w in zip(flat, wins):
        if i not in best or w > best[i][0]:  # ties keep the earlier candidate: the rewrite first
            best[i] = (w, src, text)
    rows = []
    for i, q in enumerate(questions):
        w, src, text = best.get(i, (None, None, None))
        keep = w is not None and w > 0.5
        rows.append({"question": q, "initial": initial[i], "critique": crit[i],
                     "principle": worst[i] if i in candidates else None, "revision": text, "source": src,
                     "p_better": w, "revised": keep, "final": text if keep else initial[i]})
    return rows


def constitution_preferences(judge: nn.Module, tok, questions: Sequence[str], answers_a: Sequence[str],
                             answers_b: Sequence[str], principles: Sequence[Principle]) -> dict:
    """P_CAI(a > b) = mean over principles of the order-averaged pairwise verdict under that principle.

    Returns {"preference": [P_CAI per pair], "per_principle": {name: [P_k per pair]}}.
    """
    per = {p.name: pairwise_preferences(judge, tok, questions, answers_a, answers_b,
                                        with_principle(PAIRWISE_PRINCIPLE_TEMPLATE, p))["preference"]
           for p in principles}
    n = len(questions)
    return {"preference": [sum(v[i] for v in per.values()) / len(per) for i in range(n)], "per_principle": per}
