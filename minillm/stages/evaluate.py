"""The evaluation stage (`python -m minillm eval`): perplexity and multiple-choice accuracy of a run, as JSON.

    PPL           = exp( -(1/N) sum_i log p(x_i | x_[begin(i):i]) )    strided sliding window, stride L/2
                                                                       (Hugging Face perplexity guide)
    bits_per_byte = -sum_docs ll(doc) / (sum_docs bytes(doc) * ln 2)  rolling windows per document (lm-eval)
    acc           = (1/n) sum_items [ argmax_k ll(" " + c_k | x) == gold ]   and acc_norm, acc_bytes
                                                                       (lm-evaluation-harness, Gao et al. 2021-)

`minillm/eval/perplexity.py`, `loglik.py` and `mcq.py` hold the equations; this module loads a run, picks the
prompt format, adds the optional checks (`robustness.py`: answer order and prompt format, after the Llama 3
report, Dubey et al. 2024; `contamination.py`: n-gram overlap with a training corpus) and writes the report.

Prompt formats. Besides lm-eval's (`mcq.FORMATS`: MMLU letters, two letter variants, HellaSwag-style scoring
of the choice texts after the question), `cloze` rewrites a world question as the start of the sentence
that answers it, the world's canonical answer (`world.ANSWER_TEMPLATES` up to the value):

    "Where does Mira live?" -> "The home town of Mira is"      "How old is Mira?" -> "This year, Mira is"

and scores the choice texts after it, as `hellaswag` does. A base model has read statements, never
questions, so the question's own words give it little to go on; the cloze asks for the same fact in a
sentence it can continue. `auto` (the default) takes `cloze` when every item is a world question, else
`hellaswag`. (Small models cannot use the letter formats at all: they answer every item with the same
letter. Lesson 9 shows the measurements.)
"""
from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from minillm.config import EvalConfig
from minillm.datasets import read_jsonl, read_text, split_documents, tokenize_corpus
from minillm.eval.contamination import contamination_report
from minillm.eval.loglik import model_max_length
from minillm.eval.mcq import FORMATS, evaluate_mcq, load_mcq
from minillm.eval.perplexity import document_perplexity, perplexity
from minillm.eval.robustness import answer_order_robustness
from minillm.eval.safety import safety_rates
from minillm.eval.task import answer_questions, fact_completion_accuracy
from minillm.runs import load_run
from minillm.stages.pairs import reward_model_scorer, sample_responses
from minillm.world import ANSWER_TEMPLATES, ATTRIBUTES, QUESTION_TEMPLATES

DEFAULT_PPL = "data/world/corpus_val.txt"
DEFAULT_MCQ = "data/world/mcq_test.jsonl"
DEFAULT_FEWSHOT = "data/world/mcq_dev.jsonl"
FORMAT_CHOICES = ("auto", "cloze", *FORMATS)
LETTER_FORMATS = tuple(f for f in FORMATS if f != "hellaswag")
# Measured on the world's short items (contamination.py docstring, lessons/09_evaluation.md).
CONTAMINATION_N, CONTAMINATION_THRESHOLD = EvalConfig.contamination_n, EvalConfig.contamination_threshold


# ----------------------------------------------------------------------------- the cloze format
def _question_patterns() -> list[tuple[re.Pattern, str]]:

    return [
        (re.compile(re.escape(t).replace(re.escape("{name}"), r"(?P<name>[A-Za-z]+)"), re.IGNORECASE), a)
        for a in ATTRIBUTES for t in QUESTION_TEMPLATES[a]
    ]


def world_question(item: dict) -> tuple[str, str] | None:
    """(character, attribute) asked by a world MCQ item, from its fields or its question; None if it is not one."""

    name, attribute = item.get("character"), item.get("attribute")
    if isinstance(name, str) and name and attribute in ATTRIBUTES:
        return name, attribute
    question = " ".join(str(item.get("question", "")).split())
    for pattern, attribute in _question_patterns():
        m = pattern.fullmatch(question)
        if m:
            return m["name"], attribute
    return None


def cloze_item(item: dict) -> dict:
    """The item with its question replaced by the start of its canonical answer: "The home town of Mira is".

    cloze(name, attribute) = ANSWER_TEMPLATES[attribute] up to "{value}", stripped, with the name filled in.
    """

    asked = world_question(item)
    if asked is None:
        raise ValueError(
            f"format 'cloze' needs a world question (one of world.QUESTION_TEMPLATES, or 'character' and "
            f"'attribute' fields), got {item.get('question')!r}; use --format hellaswag or mmlu for other items"
        )
    name, attribute = asked
    prefix = ANSWER_TEMPLATES[attribute].split("{value}")[0].rstrip()
    return {**item, "question": prefix.format(name=name)}


def resolve_format(fmt: str, items: Sequence[dict]) -> str:
    """'auto' -> 'cloze' when every item is a world question, else 'hellaswag'; other names are checked."""
    if fmt not in FORMAT_CHOICES:
        raise ValueError(f"format must be one of {list(FORMAT_CHOICES)}, got {fmt!r}")
    if fmt != "auto":
        return fmt
    return "cloze" if all(world_question(item) is not None for item in items) else "hellaswag"


def as_scored(items: Sequence[dict], fmt: str) -> tuple[list[dict], str]:
    """(items, mcq format) that `evaluate_mcq` scores: cloze items are scored like HellaSwag."""
    if fmt == "cloze":
        return [cloze_item(item) for item in items], "hellaswag"
    return list(items), fmt


# ----------------------------------------------------------------------------- the parts of the report
def sliding_perplexity(model, tokenizer, path: str | Path, max_length: int | None = None, stride: int | None = None,
                       batch_size: int = 32) -> dict[str, Any]:
    """`perplexity` of the whole file read as pretraining reads it (documents joined with <|endoftext|>), in
    windows of L = max_length (default block_size) every `stride` tokens (default L // 2)."""
    L = model_max_length(model, max_length)
    stride = L // 2 if stride is None else stride
    return perplexity(model, tokenize_corpus(path, tokenizer), max_length=L, stride=stride, batch_size=batch_size)


def perplexity_report(model, tokenizer, path: str | Path, max_length: int | None = None, stride: int | None = None,
                      batch_size: int = 32) -> dict[str, Any]:
    """Sliding-window token perplexity of the whole file, and lm-eval's per-document rolling metrics.

    sliding: the documents (blank-line separated) joined with <|endoftext|>, as pretraining reads them,
    scored in windows of L = max_length (default block_size) every `stride` tokens (default L // 2).
    rolling: each document scored from <|endoftext|> exactly once, giving token/word/byte perplexity
    and bits_per_byte (which compare models with different tokenizers).
    """

    L = model_max_length(model, max_length)
    stride = L // 2 if stride is None else stride
    sliding = sliding_perplexity(model, tokenizer, path, L, stride, batch_size)
    rolling = document_perplexity(model, tokenizer, split_documents(read_text(path)), max_length=L,
                                  batch_size=batch_size)
    return {"path": str(path), "max_length": L, "stride": stride, "sliding": sliding, "rolling": rolling}


def mcq_report(model, tokenizer, items: Sequence[dict], fmt: str = "auto", num_fewshot: int = 0,
               fewshot_items: Sequence[dict] | None = None, seed: int = 1234, sampler: str = "random",
               batch_size: int = 32) -> dict[str, Any]:
    """evaluate_mcq's {acc, acc_norm, acc_bytes, n, per_item} in the resolved format, plus that format's name."""

    fmt = resolve_format(fmt, items)
    scored, mcq_fmt = as_scored(items, fmt)
    pool = None if fewshot_items is None else as_scored(fewshot_items, fmt)[0]
    result = evaluate_mcq(model, tokenizer, scored, num_fewshot=num_fewshot, seed=seed, fewshot_items=pool,
                          fmt=mcq_fmt, sampler=sampler, batch_size=batch_size)
    return {"format": fmt, "num_fewshot": num_fewshot, **result}


def robustness_checks(model, tokenizer, items: Sequence[dict], fmt: str, num_fewshot: int = 0,
                      fewshot_items: Sequence[dict] | None = None, seed: int = 1234,
                      batch_size: int = 32) -> dict[str, Any]:
    """Accuracy under every cyclic order of the choices (the chosen format and MMLU letters) and per format.

    Text-scoring formats (hellaswag, cloze) score each choice alone, so they are order-invariant by
    construction; the letter formats are where the order shows.
    """

    fmt = resolve_format(fmt, items)
    formats = list(FORMATS) + (["cloze"] if all(world_question(i) is not None for i in items) else [])
    order = {}
    for name in dict.fromkeys([fmt, "mmlu"]):
        scored, mcq_fmt = as_scored(items, name)
        pool = None if fewshot_items is None else as_scored(fewshot_items, name)[0]
        result = answer_order_robustness(model, tokenizer, scored, fmt=mcq_fmt, num_fewshot=num_fewshot, seed=seed,
                                         fewshot_items=pool, batch_size=batch_size)
        order[name] = {k: v for k, v in result.items() if k != "per_item"}
    accs = {name: mcq_report(model, tokenizer, items, name, num_fewshot, fewshot_items, seed,
                             batch_size=batch_size)["acc"] for name in formats}
    values = list(accs.values())
    return {"answer_order": order,
            "prompt_format": {"acc_per_format": accs, "mean": sum(values) / len(values),
                              "spread": max(values) - min(values)}}


def contamination_check(items: Sequence[dict], corpus_path: str | Path, per_item_correct: Sequence[bool] | None,
                        n: int = CONTAMINATION_N, threshold: float = CONTAMINATION_THRESHOLD) -> dict[str, Any]:
    """contamination_report of the items against the corpus file's documents (blank-line separated)."""

    docs = split_documents(read_text(corpus_path))
    report = contamination_report(items, docs, per_item_correct=per_item_correct, n=n, threshold=threshold)
    return {"corpus": str(corpus_path), **report}


# ----------------------------------------------------------------------------- one run, end to end
def _require_file(path: str | Path | None, what: str) -> None:
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"{what}: {path}: file not found")


def evaluate_run(
    run_dir: str | Path,
    ppl: str | Path | None = DEFAULT_PPL,
    mcq: str | Path | None = DEFAULT_MCQ,
    fewshot_data: str | Path | None = DEFAULT_FEWSHOT,
    contamination: str | Path | None = None,
    method: EvalConfig | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Perplexity on `ppl` and MCQ accuracy on `mcq` (None skips either) of the run in `run_dir`.

    Few-shot examples come from `fewshot_data` (None: from the evaluated items themselves). method.robustness
    adds the answer-order and prompt-format checks; `contamination` (a corpus file) adds the n-gram
    overlap of the MCQ items with it and the accuracy on the clean and contaminated items.
    Every input file is checked before the model is loaded. Returns the report as a dict.
    """
    m = method or EvalConfig()
    if ppl is None and mcq is None:
        raise ValueError("nothing to evaluate: give a perplexity text (ppl) or multiple-choice items (mcq)")
    if contamination is not None and mcq is None:
        raise ValueError("contamination: checks the MCQ items, so it needs mcq")
    _require_file(ppl, "ppl")
    _require_file(mcq, "mcq")
    if mcq is not None and m.num_fewshot > 0:
        _require_file(fewshot_data, "fewshot_data")
    _require_file(contamination, "contamination")

    t0 = time.perf_counter()
    model, tokenizer, run_config = load_run(run_dir, device=device)
    report: dict[str, Any] = {"run": str(run_dir), "stage": run_config.get("stage"),
                              "parameters": sum(p.numel() for p in model.parameters())}
    seconds: dict[str, float] = {"load": time.perf_counter() - t0}
    if ppl is not None:
        t0 = time.perf_counter()
        report["perplexity"] = perplexity_report(model, tokenizer, ppl, m.max_length, m.stride, m.batch_size)
        seconds["perplexity"] = time.perf_counter() - t0
    if mcq is not None:
        t0 = time.perf_counter()
        items = load_mcq(mcq)
        pool = load_mcq(fewshot_data) if m.num_fewshot > 0 and fewshot_data is not None else None
        report["mcq"] = {"path": str(mcq), **mcq_report(model, tokenizer, items, m.format, m.num_fewshot, pool,
                                                        m.seed, m.sampler, m.batch_size)}
        seconds["mcq"] = time.perf_counter() - t0
        if m.robustness:
            t0 = time.perf_counter()
            report["robustness"] = robustness_checks(model, tokenizer, items, m.format, m.num_fewshot, pool,
                                                     m.seed, m.batch_size)
            seconds["robustness"] = time.perf_counter() - t0
        if contamination is not None:
            correct = [r["pred"] == r["answer"] for r in report["mcq"]["per_item"]]
            report["contamination"] = contamination_check(items, contamination, correct, m.contamination_n,
                                                          m.contamination_threshold)
    report["seconds"] = seconds
    return report


# ----------------------------------------------------------------------------- printing
def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def report_rows(report: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of a report as metric -> value (what the table and the pipeline show)."""
    rows: dict[str, Any] = {}
    if "perplexity" in report:
        p = report["perplexity"]
        rows[f"perplexity (sliding window, L={p['max_length']}, stride {p['stride']})"] = p["sliding"]["ppl"]
        rows["perplexity (per document, lm-eval rolling)"] = p["rolling"]["token_perplexity"]
        rows["bits per byte"] = p["rolling"]["bits_per_byte"]
    if "mcq" in report:
        m = report["mcq"]
        where = f"{m['format']}, {m['num_fewshot']}-shot, {m['n']} items"
        for metric in ("acc", "acc_norm", "acc_bytes"):
            rows[f"MCQ {metric} ({where})"] = m[metric]
    if "robustness" in report:
        r = report["robustness"]
        for name, order in r["answer_order"].items():
            rows[f"answer order ({name}): acc spread over rotations"] = order["spread"]
            rows[f"answer order ({name}): consistent fraction"] = order["consistent_fraction"]
        for name, acc in r["prompt_format"]["acc_per_format"].items():
            rows[f"prompt format {name}: acc"] = acc
    if "contamination" in report:
        c = report["contamination"]
        rows[f"contaminated items ({c['n']}-grams, threshold {c['threshold']})"] = \
            f"{c['n_contaminated']} of {c['n_items']}"
        rows["acc on clean / contaminated items"] = f"{_fmt(c['acc_clean'])} / {_fmt(c['acc_contaminated'])}"
    return rows


def render_table(report: dict[str, Any]) -> str:
    """A two-column plain-text table of `report_rows`, then the seconds each part took."""
    rows = report_rows(report)
    width = max(len(k) for k in rows) if rows else 0
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    lines += [f"{k:<{width}}  {_fmt(v)}" for k, v in rows.items()]
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()))
    return "\n".join(lines)


def safety_report(run_dir: str | Path, rows: Sequence[dict], max_new_tokens: int = 32,
                  shots: Sequence[dict] | None = None, reward: str | Path | None = None, n: int = 4,
                  seed: int = 0) -> dict[str, float | None]:
    """Refusal rate, false refusals on look-alikes and jailbreak success (`minillm.eval.safety.safety_rates`) of a
    run's answers to the world's safety probes (`minillm.world.safety_prompts`):

        chat model          greedy answers in the chat template
        base model (shots)  greedy answers to a plain-text few-shot prompt with the solved examples `shots`
        RM-guided (reward)  the best of n answers sampled at T=1, by the reward-model run `reward` (best-of-n)
    """
    model, tok, _ = load_run(run_dir)
    model.eval()
    questions = [r["prompt"] for r in rows]
    if shots is not None:
        answers = answer_questions(model, tok, questions, "fewshot", list(shots), max_new_tokens)
    elif reward is not None:
        messages = [[{"role": "user", "content": q}] for q in questions]
        samples = sample_responses(model, tok, messages, n, max_new_tokens=max_new_tokens, seed=seed)
        score = reward_model_scorer(reward)
        answers = []
        for m, ys in zip(messages, samples):
            scored = [i for i, y in enumerate(ys) if y]  # an empty answer is no candidate (and has no chat turn)
            r = dict(zip(scored, score([m] * len(scored), [ys[i] for i in scored]))) if scored else {}
            best = max(scored, key=lambda i: -math.inf if math.isnan(r[i]) else r[i], default=0)
            answers.append(ys[best])
    else:
        answers = answer_questions(model, tok, questions, "chat", max_new_tokens=max_new_tokens)
    return safety_rates(rows, answers)


# ----------------------------------------------------------------------------- the alignment tax
def retained_knowledge(model, tokenizer, data: str | Path, batch_size: int = 32) -> dict[str, Any]:
    """What a model still knows of its pretraining: the sliding-window perplexity of the pretraining validation
    text (`data`/corpus_val.txt, the report card's perplexity row) and greedy fact completion on the held-out
    phrasings (`data`/probes.jsonl, the base model's fact-completion row)."""
    data = Path(data)
    _require_file(data / "corpus_val.txt", "alignment tax")
    _require_file(data / "probes.jsonl", "alignment tax")
    probes = [record for _, record in read_jsonl(data / "probes.jsonl")]
    facts = fact_completion_accuracy(model.eval(), tokenizer, probes)
    return {"perplexity": sliding_perplexity(model, tokenizer, data / "corpus_val.txt", batch_size=batch_size)["ppl"],
            "fact_completion": facts["accuracy"], "n_probes": facts["n"]}


def alignment_tax(knowledge: dict[str, dict[str, Any]], base: str = "base") -> list[dict[str, Any]]:
    """One row per model of `knowledge` ({name: retained_knowledge(...)}) against the model `base`:

        perplexity ratio  = PPL_stage / PPL_base             (> 1: the stage made pretraining text less likely)
        facts lost        = facts_base - facts_stage          (share of the probes the stage forgot)
    """
    if base not in knowledge:
        raise ValueError(f"alignment_tax: no row for the base model {base!r} among {list(knowledge)}")
    b = knowledge[base]
    return [{"model": name, "perplexity": k["perplexity"], "perplexity_ratio": k["perplexity"] / b["perplexity"],
             "fact_completion": k["fact_completion"], "facts_lost": b["fact_completion"] - k["fact_completion"]}
            for name, k in knowledge.items()]


def run_alignment_tax(runs: dict[str, str | Path], data: str | Path, base: str = "base") -> list[dict[str, Any]]:
    """`alignment_tax` of the runs {name: run_dir} (one of them the base model `base`) on the world in `data`."""
    knowledge = {}
    for name, run_dir in runs.items():
        model, tok, _ = load_run(run_dir)
        knowledge[name] = retained_knowledge(model, tok, data)
    return alignment_tax(knowledge, base)


def render_alignment_tax(rows: Sequence[dict[str, Any]]) -> str:
    """The alignment-tax table in markdown."""
    lines = ["| model | pretraining val perplexity | x base | fact completion | facts lost |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['model']} | {r['perplexity']:.3f} | {r['perplexity_ratio']:.2f} | {r['fact_completion']:.3f} | "
              f"{r['facts_lost']:+.3f} |" for r in rows]
    return "\n".join(lines)
