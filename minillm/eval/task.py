"""Task-level evaluation on the world: does the model know the facts?

Fact completion (after pretraining): for every probe "Mira lives in" -> "Oakvale" in a phrasing the corpus
never used, greedy-decode a few tokens and count the probe correct when the completion starts with the answer:

    accuracy = (1/N) sum_i [ normalize(greedy(prompt_i)) starts with normalize(answer_i) ]

Instruction following (after SFT): greedy answers to held-out chat questions, scored by exact match, refusals,
the gold reward, and whether a fact answer talks about the wrong person:

    wrong_character = mean over fact questions of [ the answer names a character other than the one asked ]
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from minillm.model import GPT
from minillm.sampling import generate_completions
from minillm.world import gold_reward, is_refusal, make_world, normalize_answer


def named_characters(text: str, names: Iterable[str]) -> list[str]:
    """The names that occur in `text` as whole words (any case; "Sive's" names Sive), in the order given."""
    return [n for n in names if re.search(rf"\b{re.escape(n)}\b", text, flags=re.IGNORECASE)]


def wrong_character(answer: str, asked: str, names: Iterable[str]) -> bool:
    """True when `answer` names a character other than `asked` ("Which colour does Corin like best?" ->
    "Sive's favourite colour is grey."); an answer that names nobody is not a wrong-character answer."""
    return any(n.lower() != asked.lower() for n in named_characters(answer, names))


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


ARTICLES = ("a", "an", "the")


def completion_matches(completion: str, answer: str) -> bool:
    """True when the completion's first words are the answer's words (case, punctuation and one leading
    article ignored: "Mira's favourite fruit is" -> " the plum." answers "plum")."""
    want, got = _words(answer), _words(completion)
    if got[:1] and got[0] in ARTICLES and want[:1] != got[:1]:
        got = got[1:]
    return bool(want) and got[: len(want)] == want


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


# ------------------------------------------------------------------------------------------------
# Instruction following: greedy answers to held-out questions, chat template vs few-shot prompt
# ------------------------------------------------------------------------------------------------
FEWSHOT_TEMPLATE = "Question: {q}\nAnswer: {a}\n\n"


def fewshot_prompt(question: str, shots: list[dict[str, Any]]) -> str:
    """A plain-text few-shot prompt for a *base* model, which never saw the chat tokens:

        Question: q_1\\nAnswer: a_1\\n\\n ... Question: q\\nAnswer:
    """
    head = "".join(FEWSHOT_TEMPLATE.format(q=_user(s), a=_assistant(s)) for s in shots)
    return head + f"Question: {question}\nAnswer:"


def _user(record: dict[str, Any]) -> str:
    return next(m["content"] for m in record["messages"] if m["role"] == "user")


def _assistant(record: dict[str, Any]) -> str:
    return next(m["content"] for m in record["messages"] if m["role"] == "assistant")


def answer_questions(model, tokenizer, questions: list[str], mode: str = "chat",
                     shots: list[dict[str, Any]] | None = None, max_new_tokens: int = 32,
                     batch_size: int = 64) -> list[str]:
    """Greedy answers. mode="chat": the chat template with a generation prompt, stop at <|end|>.
    mode="fewshot": `fewshot_prompt` with `shots`, the answer is the text up to the first newline."""
    if mode == "chat":
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)[0]
                   for q in questions]
        outs = generate_completions(model, prompts, max_new_tokens, eos_id=tokenizer.end_id, temperature=0,
                                    batch_size=batch_size)
        return [tokenizer.decode(o).strip() for o in outs]
    if mode == "fewshot":
        prompts = [tokenizer.encode(fewshot_prompt(q, shots or [])) for q in questions]
        outs = generate_completions(model, prompts, max_new_tokens, eos_id=tokenizer.eot_id, temperature=0,
                                    batch_size=batch_size)
        return [tokenizer.decode(o).split("\n")[0].strip() for o in outs]
    raise ValueError(f"answer_questions: mode must be 'chat' or 'fewshot', got {mode!r}")


def evaluate_instructions(model, tokenizer, records: list[dict[str, Any]], mode: str = "chat",
                          shots: list[dict[str, Any]] | None = None, world=None) -> dict[str, Any]:
    """Exact match, refusal accuracy and mean gold reward of greedy answers to `records` (sft_test rows).

        exact_match      = mean over fact/math rows of [normalize(answer) == normalize(reference)]
        refusal_accuracy = mean over forbidden rows of [answer refuses]
        false_refusals   = mean over fact/math rows of [answer refuses]
        gold_reward      = mean over all rows of gold_reward(question, answer)
        wrong_character  = mean over fact rows of [answer names another character than the row's]
    """

    world = world or make_world(0)
    questions = [_user(r) for r in records]
    answers = answer_questions(model, tokenizer, questions, mode=mode, shots=shots)
    names = [c.name for c in world.characters]
    rows = []
    for r, q, a in zip(records, questions, answers):
        ref = _assistant(r)
        rows.append({"question": q, "answer": a, "reference": ref, "kind": r.get("kind"),
                     "exact": normalize_answer(a) == normalize_answer(ref), "refused": is_refusal(a),
                     "gold_reward": gold_reward(q, a, world),
                     "wrong_character": bool(r.get("character")) and wrong_character(a, r["character"], names)})
    answerable = [x for x in rows if x["kind"] != "refusal"]
    forbidden = [x for x in rows if x["kind"] == "refusal"]
    facts = [x for x in rows if x["kind"] == "fact"]

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    return {
        "mode": mode,
        "n": len(rows),
        "exact_match": mean([x["exact"] for x in answerable]),
        "fact_exact_match": mean([x["exact"] for x in facts]),
        "refusal_accuracy": mean([x["refused"] for x in forbidden]),
        "false_refusals": mean([x["refused"] for x in answerable]),
        "gold_reward": mean([x["gold_reward"] for x in rows]),
        "wrong_character": mean([x["wrong_character"] for x in facts]),
        "rows": rows,
    }
