"""Multiple-choice evaluation by log-likelihood ranking, as lm-evaluation-harness scores MMLU and HellaSwag.

For a question rendered as a context x and choices c_1..c_K, each choice is one log-likelihood request
with the target delimiter " " in front (lm-eval `ConfigurableTask`, `output_type: multiple_choice`):

    ll_k      = log p_theta(" " + c_k | x)                       (`minillm.eval.loglik.loglikelihood`)
    acc       = [ argmax_k ll_k                == gold ]
    acc_norm  = [ argmax_k ll_k / len(c_k)     == gold ]          len = characters of the choice
    acc_bytes = [ argmax_k ll_k / bytes(c_k)   == gold ]          bytes = UTF-8 length

Long choices collect more negative log-probability just for being long; acc_norm divides it out
(HellaSwag, Zellers et al. 2019, reports it). Ties go to the first choice, as numpy's argmax does.

Two prompt styles, after Hendrycks et al. (2021, MMLU) and Zellers et al. (2019, HellaSwag):

    mmlu       "{question}\\nA. {c_1}\\nB. {c_2}\\n...\\nAnswer:"   scored on the letters " A", " B", ...
    hellaswag  "{question}"                                      scored on the choice texts " {c_k}"

(plus two letter-style variants, `paren` and `qa`, for the prompt-format robustness check). k-shot
prompts put k solved examples first, each "text + ' ' + target", joined and followed by "\\n\\n":

    description + ex_1 + "\\n\\n" + ... + ex_k + "\\n\\n" + text(doc)

drawn by `random.Random(seed).sample` (lm-eval's default sampler, seed 1234, one generator for the whole
run) or the first k (`first_n`, what lm-eval's MMLU uses with its dev split). When the examples come
from the evaluated items themselves, k + 1 are drawn and the evaluated item is dropped if drawn.

Items are dicts {question: str, choices: list[str], answer: int} (extra keys such as `subject` are kept).
"""
from __future__ import annotations

import csv
import json
import os
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn

from minillm.datasets import read_jsonl
from minillm.eval.loglik import loglikelihood
from minillm.utils import atomic_write_text

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# ----------------------------------------------------------------------------- items
def validate_item(item: Any, where: str) -> None:
    """Raise ValueError/TypeError naming `where` unless item is {question: str, choices: [>= 2 str], answer: int}."""
    if not isinstance(item, dict):
        raise TypeError(f"{where}: an item must be a dict, got {type(item).__name__}")
    for key in ("question", "choices", "answer"):
        if key not in item:
            raise ValueError(f"{where}: missing field {key!r}")
    if not isinstance(item["question"], str):
        raise ValueError(f"{where}: question must be a string, got {type(item['question']).__name__}")
    choices = item["choices"]
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"{where}: choices must be a list of strings")
    if len(choices) < 2:
        raise ValueError(f"{where}: needs at least 2 choices, got {len(choices)}")
    if len(choices) > len(LETTERS):
        raise ValueError(f"{where}: at most {len(LETTERS)} choices (one letter each), got {len(choices)}")
    answer = item["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise ValueError(f"{where}: answer must be an integer index, got {answer!r}")
    if not 0 <= answer < len(choices):
        raise ValueError(f"{where}: answer {answer} is out of range for {len(choices)} choices")


# ----------------------------------------------------------------------------- prompt formats
def mmlu_text(item: dict) -> str:
    """lm-eval's MMLU prompt: "{question.strip()}\\nA. {c0}\\nB. {c1}...\\nAnswer:"."""
    lines = [item["question"].strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(item["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def paren_text(item: dict) -> str:
    """Letter variant: "{question}\\n(A) {c0}\\n(B) {c1}...\\nAnswer:"."""
    lines = [item["question"].strip()] + [f"({LETTERS[i]}) {c}" for i, c in enumerate(item["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def qa_text(item: dict) -> str:
    """Letter variant: "Question: {question}\\nChoices:\\nA: {c0}...\\nAnswer:"."""
    lines = [f"Question: {item['question'].strip()}", "Choices:"]
    lines += [f"{LETTERS[i]}: {c}" for i, c in enumerate(item["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def hellaswag_text(item: dict) -> str:
    """HellaSwag-style: the context itself; the choices are scored as its continuations."""
    return item["question"]


def letter_choices(item: dict) -> list[str]:
    """The answer letters "A", "B", ... that a letter-style prompt is scored on."""
    return list(LETTERS[: len(item["choices"])])


def text_choices(item: dict) -> list[str]:
    """The choice texts themselves."""
    return list(item["choices"])


# name -> (doc_to_text, doc_to_choice)
FORMATS: dict[str, tuple[Callable[[dict], str], Callable[[dict], list[str]]]] = {
    "mmlu": (mmlu_text, letter_choices),
    "paren": (paren_text, letter_choices),
    "qa": (qa_text, letter_choices),
    "hellaswag": (hellaswag_text, text_choices),
}


def _format(fmt: str) -> tuple[Callable[[dict], str], Callable[[dict], list[str]]]:
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {sorted(FORMATS)}, got {fmt!r}")
    return FORMATS[fmt]


def description(item: dict, fmt: str) -> str:
    """MMLU's task description when the item names its subject ("high_school_physics" -> "high school physics")."""
    if fmt == "mmlu" and isinstance(item.get("subject"), str) and item["subject"]:
        subject = item["subject"].replace("_", " ")
        return f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    return ""


def fewshot_examples(
    item: dict, pool: Sequence[dict], num_fewshot: int, rnd: random.Random, same_split: bool, sampler: str = "random"
) -> list[dict]:
    """The k solved examples shown before `item` (lm-eval `ContextSampler.get_context`).

    Draw k + 1 when the pool is the evaluated split itself, then drop the evaluated item and keep k.
    """
    n_samples = num_fewshot + 1 if same_split else num_fewshot
    if n_samples > len(pool):
        raise ValueError(
            f"num_fewshot: need {n_samples} few-shot examples"
            f"{' (k + 1, since they come from the evaluated items)' if same_split else ''}, "
            f"the pool has {len(pool)}"
        )
    drawn = rnd.sample(list(pool), n_samples) if sampler == "random" else list(pool[:n_samples])
    return [ex for ex in drawn if ex != item][:num_fewshot]


def build_context(item: dict, examples: Sequence[dict], fmt: str) -> str:
    """description + (text(ex) + " " + target(ex) + "\\n\\n") per example + text(item)."""
    doc_to_text, doc_to_choice = _format(fmt)
    shots = "".join(
        doc_to_text(ex) + TARGET_DELIMITER + doc_to_choice(ex)[ex["answer"]] + FEWSHOT_DELIMITER for ex in examples
    )
    return description(item, fmt) + shots + doc_to_text(item)


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (numpy's argmax rule)."""
    return max(range(len(values)), key=lambda i: values[i])


def choose(lls: Sequence[float], choices: Sequence[str]) -> tuple[int, int, int]:
    """(pred, pred_norm, pred_bytes): argmax of ll, ll / characters, ll / UTF-8 bytes of each choice."""
    if len(lls) != len(choices):
        raise ValueError(f"lls ({len(lls)}) and choices ({len(choices)}) must have the same length")
    if any(len(c) == 0 for c in choices):
        raise ValueError("choose: a choice is empty, so it has no length to normalise by")
    # BEGIN ASSIGNMENT mcq-choose
    pred = _argmax(lls)
    pred_norm = _argmax([ll / len(c) for ll, c in zip(lls, choices)])
    pred_bytes = _argmax([ll / len(c.encode("utf-8")) for ll, c in zip(lls, choices)])
    return pred, pred_norm, pred_bytes
    # END ASSIGNMENT


def evaluate_mcq(
    model: nn.Module,
    tokenizer,
    items: Sequence[dict],
    num_fewshot: int = 0,
    seed: int = 1234,
    fewshot_items: Sequence[dict] | None = None,
    fmt: str = "hellaswag",
    sampler: str = "random",
    batch_size: int = 32,
) -> dict[str, Any]:
    """acc / acc_norm / acc_bytes of ranking each item's choices by log-likelihood (see the module docstring).

    fewshot_items: the split the k examples come from (a dev split); None takes them from `items`.
    sampler: "random" (random.Random(seed).sample, advanced item after item) or "first_n".
    Returns {acc, acc_norm, acc_bytes, n, per_item}; per_item[i] holds the context, the ll of every
    choice, the three predictions and the gold answer.
    """
    doc_to_text, doc_to_choice = _format(fmt)
    if isinstance(items, dict) or not isinstance(items, Sequence) or len(items) == 0:
        raise ValueError("items must be a non-empty list of {question, choices, answer} dicts")
    for i, item in enumerate(items):
        validate_item(item, f"items[{i}]")
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise ValueError(f"num_fewshot must be a non-negative integer, got {num_fewshot!r}")
    if sampler not in ("random", "first_n"):
        raise ValueError(f"sampler must be 'random' or 'first_n', got {sampler!r}")
    same_split = fewshot_items is None or fewshot_items is items
    pool = items if fewshot_items is None else fewshot_items
    if not same_split:
        for i, item in enumerate(pool):
            validate_item(item, f"fewshot_items[{i}]")

    rnd = random.Random(seed)
    contexts, requests = [], []
    for item in items:
        examples = fewshot_examples(item, pool, num_fewshot, rnd, same_split, sampler) if num_fewshot else []
        context = build_context(item, examples, fmt)
        contexts.append(context)
        requests += [(context, TARGET_DELIMITER + c) for c in doc_to_choice(item)]
    results = loglikelihood(model, tokenizer, requests, batch_size=batch_size)

    per_item, start = [], 0
    for item, context in zip(items, contexts):
        choices = doc_to_choice(item)
        scored = results[start:start + len(choices)]
        start += len(choices)
        lls = [ll for ll, _ in scored]
        pred, pred_norm, pred_bytes = choose(lls, choices)
        per_item.append({
            "context": context, "choices": choices, "lls": lls, "is_greedy": [g for _, g in scored],
            "pred": pred, "pred_norm": pred_norm, "pred_bytes": pred_bytes, "answer": item["answer"],
        })
    n = len(per_item)
    return {
        "acc": sum(r["pred"] == r["answer"] for r in per_item) / n,
        "acc_norm": sum(r["pred_norm"] == r["answer"] for r in per_item) / n,
        "acc_bytes": sum(r["pred_bytes"] == r["answer"] for r in per_item) / n,
        "n": n,
        "per_item": per_item,
    }


# ----------------------------------------------------------------------------- loaders
def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleaning: strip, " [title]" -> ". ", drop [bracketed] tags, collapse double spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _answer_index(answer: Any, choices: list[str], where: str) -> int:
    """An int index, or a string: a choice text (lm-eval's string gold) or the decimal index HellaSwag stores."""
    if isinstance(answer, bool):
        raise ValueError(f"{where}: answer must be an index or a choice, got {answer!r}")
    if isinstance(answer, int):
        index = answer
    elif isinstance(answer, str) and answer in choices:
        index = choices.index(answer)
    else:
        raise ValueError(f"{where}: answer {answer!r} is neither an integer index nor one of the choices")
    if not 0 <= index < len(choices):
        raise ValueError(f"{where}: answer {index} is out of range for {len(choices)} choices")
    return index


def _item_from_ours(record: dict, where: str) -> dict:
    for key in ("question", "choices", "answer"):
        if key not in record:
            raise ValueError(f"{where}: missing field {key!r}")
    choices = record["choices"]
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"{where}: choices must be a list of strings")
    if len(choices) < 2:
        raise ValueError(f"{where}: needs at least 2 choices, got {len(choices)}")
    item = {**record, "answer": _answer_index(record["answer"], choices, where)}
    validate_item(item, where)
    return item


def _item_from_hellaswag(record: dict, where: str) -> dict:
    """query = activity_label + ": " + ctx_a + " " + ctx_b.capitalize() when those fields exist, else ctx."""
    if "endings" not in record or "label" not in record:
        raise ValueError(f"{where}: a HellaSwag record needs 'endings' and 'label'")
    if all(isinstance(record.get(k), str) for k in ("activity_label", "ctx_a", "ctx_b")):
        query = record["activity_label"] + ": " + record["ctx_a"] + " " + record["ctx_b"].capitalize()
    elif isinstance(record.get("ctx"), str):
        query = record["ctx"]
    else:
        raise ValueError(f"{where}: a HellaSwag record needs 'ctx' (or activity_label, ctx_a, ctx_b)")
    endings = record["endings"]
    if not isinstance(endings, list) or not all(isinstance(e, str) for e in endings):
        raise ValueError(f"{where}: endings must be a list of strings")
    label = record["label"]
    if isinstance(label, str):
        if not label.strip().isdigit():
            raise ValueError(f"{where}: label {label!r} is not an index (the HellaSwag test split has no labels)")
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int):
        raise ValueError(f"{where}: label must be an integer or a digit string, got {label!r}")
    item = {"question": hellaswag_preprocess(query), "choices": [hellaswag_preprocess(e) for e in endings],
            "answer": label}
    validate_item(item, where)
    return item


def _load_jsonl(path: Path) -> list[dict]:
    items, kind = [], None
    for lineno, record in read_jsonl(path):
        where = f"{path}:{lineno}"
        if kind is None:  # the first record decides the format of the file
            kind = "hellaswag" if "endings" in record else "ours"
        items.append(_item_from_hellaswag(record, where) if kind == "hellaswag" else _item_from_ours(record, where))
    return items


MMLU_COLUMNS = ["question", "A", "B", "C", "D", "answer"]


def _subject_from_filename(path: Path) -> str | None:
    """Hendrycks' files are named {subject}_{dev,val,test}.csv."""
    m = re.fullmatch(r"(.+)_(dev|val|test)", path.stem)
    return m.group(1) if m else None


def _mmlu_row(values: list[str], where: str) -> dict:
    question, *choices, answer = values
    answer = answer.strip()
    if len(answer) == 1 and answer.upper() in "ABCD":
        index = "ABCD".index(answer.upper())
    elif answer.isdigit() and int(answer) < 4:
        index = int(answer)
    else:
        raise ValueError(f"{where}: answer {answer!r} must be a letter A-D or an index 0-3")
    return {"question": question, "choices": choices, "answer": index}


def _load_mmlu_csv(path: Path) -> list[dict]:
    """MMLU CSV: question,A,B,C,D,answer per row, with or without that header row (an extra `subject` column is kept)."""
    subject = _subject_from_filename(path)
    items: list[dict] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        columns = None
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row or all(not v.strip() for v in row):
                continue
            if columns is None and not items and {"question", "answer"} <= {v.strip().lower() for v in row}:
                header = [v.strip() for v in row]
                lower = {h.lower(): i for i, h in enumerate(header)}
                missing = [c for c in MMLU_COLUMNS if c.lower() not in lower]
                if missing:
                    raise ValueError(f"{where}: missing column(s) {missing}; an MMLU CSV has {','.join(MMLU_COLUMNS)}")
                columns = lower
                continue
            if columns is not None:
                if len(row) != len(columns):
                    raise ValueError(f"{where}: expected {len(columns)} columns like the header, got {len(row)}")
                item = _mmlu_row([row[columns[c.lower()]] for c in MMLU_COLUMNS], where)
                row_subject = row[columns["subject"]] if "subject" in columns else subject
            else:
                if len(row) != len(MMLU_COLUMNS):
                    raise ValueError(
                        f"{where}: expected {len(MMLU_COLUMNS)} columns ({','.join(MMLU_COLUMNS)}), got {len(row)}"
                    )
                item = _mmlu_row(row, where)
                row_subject = subject
            if row_subject:
                item["subject"] = row_subject
            validate_item(item, where)
            items.append(item)
    return items


def load_mcq(path: str | os.PathLike) -> list[dict]:
    """Multiple-choice items from our JSONL, an MMLU CSV or a HellaSwag JSONL, detected from the file.

    .csv -> MMLU (question,A,B,C,D,answer; answer a letter or an index); .jsonl/.json lines -> HellaSwag
    when the first record has `endings` (ctx, endings, label; label may be a string), else ours
    (question, choices, answer). A bad record raises ValueError "path:line: reason".
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    if path.suffix.lower() == ".csv":
        items = _load_mmlu_csv(path)
    elif path.suffix.lower() in (".jsonl", ".json"):
        items = _load_jsonl(path)
    else:
        raise ValueError(f"{path}: unknown multiple-choice format (expected .jsonl, .json or .csv)")
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def save_mcq(items: Sequence[dict], path: str | os.PathLike) -> None:
    """Write items as our JSONL, atomically."""

    for i, item in enumerate(items):
        validate_item(item, f"items[{i}]")
    atomic_write_text(path, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
