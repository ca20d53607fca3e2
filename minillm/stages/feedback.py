"""The AI-feedback stage (`python -m minillm feedback`): who labels the preference pairs, and what it costs.

RLHF pays people to say which of two answers is better. RLAIF (Bai et al. 2022; Lee et al. 2023) asks a model;
Zephyr (Tunstall et al. 2023) runs DPO on pairs a larger model labelled. Here every labeller labels the same
pairs (`prefs_train.jsonl`), we measure how often it agrees with the world's gold reward, and we train one DPO
model per labeller from the same SFT model, so the gold reward of each model says what its labels were worth:

    gold            the world's gold reward (the "human" labels)
    rm              the Bradley-Terry reward model:  P(c > r) = sigma(r(x, c) - r(x, r))
    judge           the SFT model as a judge: the order-averaged p("A") vs p("B") (`minillm.eval.judge`)
    trained-judge   the SFT model fine-tuned on the verdicts of `judge_labels` gold-labelled pairs (a small human
                    budget), which then labels the rest; its DPO data keeps the gold labels it learned from
    constitution    the trained judge reading each principle of a constitution (`minillm.align.constitution`)

and Constitutional AI end to end: critique -> revision of the SFT model's own answers -> SFT on the revisions
(SL-CAI) -> pairs of SL-CAI samples labelled by the constitution -> DPO (RL-CAI).

Label files (`labels/<name>.jsonl`, one line per pair of the pairs file, in its order):
{"prompt": the pair's prompt, "p_chosen": P(chosen > rejected) in [0, 1]}. Your own labels (people in a class,
another model) come in with `--labels NAME=FILE` and are checked line by line against the pairs.
"""
from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from minillm.align.constitution import (
    CRITIQUE_TEMPLATE,
    PAIRWISE_PRINCIPLE_TEMPLATE,
    Principle,
    constitution_preferences,
    critique_revise,
    read_constitution,
    with_principle,
)
from minillm.config import DPOConfig, FeedbackConfig, SFTConfig, TrainConfig
from minillm.datasets import read_jsonl
from minillm.eval.judge import (
    PAIRWISE_TEMPLATE,
    SINGLE_TEMPLATE,
    agreement,
    cohen_kappa,
    pairwise_preferences,
)
from minillm.eval.task import evaluate_instructions
from minillm.runs import load_plain_run
from minillm.stages.dpo import reward_and_kl, run_dpo
from minillm.stages.evaluate import safety_report
from minillm.stages.judge import gold_preference, load_pairs
from minillm.stages.pairs import reward_model_scorer, sample_responses, write_pairs
from minillm.stages.sft import run_sft
from minillm.utils import atomic_write_text, write_json
from minillm.world import make_world

__all__ = [
    "LABELLERS",
    "judge_training_chats",
    "label_agreement",
    "read_labels",
    "relabel",
    "render_feedback_report",
    "run_feedback",
    "write_labels",
]

LABELLERS = ("gold", "rm", "judge", "trained-judge", "constitution")


# ----------------------------------------------------------------------------- label files
def write_labels(pairs: list[dict[str, Any]], p_chosen: list[float], path: str | os.PathLike) -> Path:
    """One {"prompt", "p_chosen"} line per pair, atomically."""
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps({"prompt": r["prompt"], "p_chosen": p}, ensure_ascii=False) + "\n"
                                    for r, p in zip(pairs, p_chosen)))
    return path


def read_labels(path: str | os.PathLike, pairs: list[dict[str, Any]], pairs_path: str | os.PathLike
                ) -> list[float]:
    """P(chosen > rejected) per pair from a label file, which must follow the pairs file line for line.

    Refused with file:line: a label count that differs from the pair count, a prompt that is not the pair's
    prompt, a p_chosen that is not a number in [0, 1].
    """
    path = Path(path)
    rows = list(read_jsonl(path))
    if len(rows) != len(pairs):
        raise ValueError(f"{path}: {len(rows)} labels for the {len(pairs)} pairs of {pairs_path}; a label file has "
                         "one line per pair, in the pairs' order")
    out = []
    for k, ((line, r), pair) in enumerate(zip(rows, pairs)):
        if r.get("prompt") != pair["prompt"]:
            raise ValueError(f"{path}:{line}: prompt {r.get('prompt')!r} does not match pair {k + 1} of "
                             f"{pairs_path}, {pair['prompt']!r}")
        p = r.get("p_chosen")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"{path}:{line}: 'p_chosen' must be a number in [0, 1], got {p!r}")
        out.append(float(p))
    return out


def relabel(pairs: list[dict[str, Any]], p_chosen: list[float]) -> list[dict[str, Any]]:
    """The pairs as the labeller sees them: chosen and rejected swapped where P(chosen > rejected) < 1/2, dropped
    where it is exactly 1/2 (no preference)."""
    out = []
    for r, p in zip(pairs, p_chosen):
        if p == 0.5:
            continue
        c, w = (r["chosen"], r["rejected"]) if p > 0.5 else (r["rejected"], r["chosen"])
        out.append({"prompt": r["prompt"], "chosen": c, "rejected": w, "kind": r["kind"],
                    "rejected_kind": r["rejected_kind"], "label": p})
    return out


def label_agreement(p_chosen: list[float], gold: list[float], seed: int = 0) -> dict[str, float]:
    """Agreement and Cohen's kappa of P(chosen > rejected) with gold's, in a seeded random a/b orientation per
    pair (in the files chosen is always gold's pick, and kappa needs both answers to occur); None when gold ties
    on every pair."""
    coin = random.Random(seed)
    flips = [coin.random() < 0.5 for _ in p_chosen]
    keep = [i for i, g in enumerate(gold) if g != 0.5]
    if not keep:  # gold ties on every pair: nothing to agree on
        return {"agreement": None, "kappa": None, "n": 0}
    j = [1 - p_chosen[i] if flips[i] else p_chosen[i] for i in keep]
    g = [1 - gold[i] if flips[i] else gold[i] for i in keep]
    return {"agreement": agreement(j, g), "kappa": cohen_kappa(j, g), "n": len(keep)}


# ----------------------------------------------------------------------------- labellers
def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def rm_labels(rm_run: str | os.PathLike, pairs: list[dict[str, Any]]) -> list[float]:
    """P(c > r) = sigma(r(x, c) - r(x, r)) under the reward model (1/2 for a pair that does not fit)."""
    score = reward_model_scorer(rm_run)
    msgs = [[{"role": "user", "content": r["prompt"]}] for r in pairs]
    rc, rr = score(msgs, [r["chosen"] for r in pairs]), score(msgs, [r["rejected"] for r in pairs])
    return [0.5 if math.isnan(a) or math.isnan(b) else _sigmoid(a - b) for a, b in zip(rc, rr)]


def judge_labels(judge, tok, pairs: list[dict[str, Any]]) -> list[float]:
    """The judge's order-averaged P(chosen > rejected)."""
    return pairwise_preferences(judge, tok, [r["prompt"] for r in pairs], [r["chosen"] for r in pairs],
                                [r["rejected"] for r in pairs])["preference"]


def constitution_labels(judge, tok, pairs: list[dict[str, Any]], principles: list[Principle]) -> dict[str, Any]:
    """P_CAI(chosen > rejected): the order-averaged verdict under each principle, averaged over principles
    ({"preference", "per_principle"} as `constitution_preferences`)."""
    return constitution_preferences(judge, tok, [r["prompt"] for r in pairs], [r["chosen"] for r in pairs],
                                    [r["rejected"] for r in pairs], principles)


def judge_training_chats(pairs: list[dict[str, Any]], principles: list[Principle] = ()) -> list[dict[str, Any]]:
    """Verdict chats from gold-labelled pairs: each pair in both orders under the pairwise template (answer "A"
    or "B"), and each answer alone under the single-answer template ("Yes" for chosen, "No" for rejected); the
    same under the constitution's templates with each principle filled in.

    The verdict does not depend on the principle (a gold label says which answer is better, not which rule the
    other broke): the judge learns the templates' format, and the report measures whether it reads the
    principle's words at all (agreement per principle).
    """
    pairwise = [PAIRWISE_TEMPLATE] + [with_principle(PAIRWISE_PRINCIPLE_TEMPLATE, p) for p in principles]
    single = [SINGLE_TEMPLATE] + [with_principle(CRITIQUE_TEMPLATE, p) for p in principles]
    chats = []
    for r in pairs:
        x, c, w = r["prompt"], r["chosen"], r["rejected"]
        for template in pairwise:
            for a, b, verdict in ((c, w, "A"), (w, c, "B")):
                chats.append(_chat(template.format(question=x, a=a, b=b), verdict))
        for template in single:
            for y, verdict in ((c, "Yes"), (w, "No")):
                chats.append(_chat(template.format(question=x, answer=y), verdict))
    return chats


def _chat(user: str, assistant: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def label_with(labellers: Sequence[str], pairs: list[dict[str, Any]], test: list[dict[str, Any]], gold: list[float],
               gold_test: list[float], n_budget: int, rm, sft_model, judge_model, tok,
               principles: list[Principle]) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, float]]:
    """P(chosen > rejected) of every labeller on the training pairs and on the held-out pairs, and the constitution
    labeller's held-out agreement one principle at a time."""
    labels: dict[str, list[float]] = {}
    label_test: dict[str, list[float]] = {}
    per_principle: dict[str, float] = {}
    for name in labellers:
        if name == "gold":
            labels[name], label_test[name] = gold, gold_test
        elif name == "rm":
            labels[name], label_test[name] = rm_labels(rm, pairs), rm_labels(rm, test)
        elif name == "judge":
            labels[name], label_test[name] = judge_labels(sft_model, tok, pairs), judge_labels(sft_model, tok, test)
        elif name == "trained-judge":
            ai = judge_labels(judge_model, tok, pairs[n_budget:])
            labels[name] = gold[:n_budget] + ai  # the budget's own pairs keep the labels the judge learned from
            label_test[name] = judge_labels(judge_model, tok, test)
        else:
            labels[name] = constitution_labels(judge_model, tok, pairs, principles)["preference"]
            by_principle = constitution_labels(judge_model, tok, test, principles)
            label_test[name] = by_principle["preference"]
            per_principle = {k: label_agreement(v, gold_test)["agreement"]
                             for k, v in by_principle["per_principle"].items()}
    return labels, label_test, per_principle


# ----------------------------------------------------------------------------- evaluation of a trained model
def heldout_scores(run_dir: str | os.PathLike, reference, records: list[dict[str, Any]], safety: list[dict],
                   samples: int) -> dict[str, Any]:
    """Greedy exact match / gold reward on the held-out chats, the T=1 gold reward and KL to the SFT model, and
    the safety rates on the held-out probes."""
    policy, tok, _ = load_plain_run(run_dir)
    greedy = evaluate_instructions(policy, tok, records)
    prompts = [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in records]
    sampled = reward_and_kl(policy, reference, tok, prompts, n_samples=samples)
    rates = safety_report(run_dir, safety) if safety else {}
    return {"exact_match": greedy["exact_match"], "gold_reward": greedy["gold_reward"],
            "gold_reward_sampled": sampled["reward"], "kl": sampled["kl"],
            "refusal_rate": rates.get("refusal_rate"), "false_refusal_rate": rates.get("false_refusal_rate"),
            "jailbreak_success": rates.get("jailbreak_success")}


# ----------------------------------------------------------------------------- the stage
def run_feedback(sft: str | os.PathLike, rm: str | os.PathLike | None, data: str | os.PathLike,
                 out: str | os.PathLike, sft_cfg: TrainConfig, dpo_cfg: TrainConfig,
                 method: FeedbackConfig | None = None, dpo_method: DPOConfig | None = None,
                 constitution: str | os.PathLike = "data/constitution.txt",
                 labellers: tuple[str, ...] | list[str] = LABELLERS, extra_labels: dict[str, str] | None = None,
                 cai: bool = True, progress: bool = True) -> dict[str, Any]:
    """Label data/prefs_train.jsonl with each labeller, DPO the SFT run on each, and (cai) run Constitutional AI;
    writes out/labels/, out/pairs/, one run per model, out/results.json and out/report.md."""
    method = method or FeedbackConfig()
    data, out = Path(data), Path(out)
    unknown = [name for name in labellers if name not in LABELLERS]
    if unknown:
        raise ValueError(f"--labellers: unknown {unknown}; choose from {list(LABELLERS)}")
    if "rm" in labellers and rm is None:
        raise ValueError("the 'rm' labeller needs --rm (a reward-model run)")
    principles = read_constitution(constitution)  # a bad file fails here, before minutes of work
    pairs_path, test_path = data / "prefs_train.jsonl", data / "prefs_test.jsonl"
    pairs, test = load_pairs(pairs_path), load_pairs(test_path)
    extra = {name: read_labels(path, pairs, pairs_path) for name, path in (extra_labels or {}).items()}
    world = make_world(0)
    gold = [gold_preference(r["prompt"], r["chosen"], r["rejected"], world) for r in pairs]
    gold_test = [gold_preference(r["prompt"], r["chosen"], r["rejected"], world) for r in test]
    sft_model, tok, _ = load_plain_run(sft)
    if method.dpo_steps is not None:
        dpo_cfg = replace(dpo_cfg, max_steps=method.dpo_steps)
    if method.dpo_lr is not None:
        dpo_cfg = replace(dpo_cfg, lr=method.dpo_lr, min_lr=method.dpo_lr / 10)
    n_budget = min(method.judge_labels, len(pairs))

    judge_model = None
    if {"trained-judge", "constitution"} & set(labellers) or cai:
        chats = judge_training_chats(pairs[:n_budget], principles)
        judge_run = run_sft(sft, write_pairs(chats, out / "judge_train.jsonl"), out / "trained_judge", sft_cfg,
                            SFTConfig(), progress=progress)
        judge_model = judge_run.model

    labels, label_test, per_principle = label_with(labellers, pairs, test, gold, gold_test, n_budget, rm, sft_model,
                                                   judge_model, tok, principles)
    labels.update(extra)

    rows: dict[str, dict[str, Any]] = {}
    records = [r for _, r in read_jsonl(data / "sft_test.jsonl")]
    safety = [r for _, r in read_jsonl(data / "safety_test.jsonl")] if (data / "safety_test.jsonl").is_file() else []
    rows["SFT (no preference step)"] = heldout_scores(sft, sft_model, records, safety, method.eval_samples)
    for name, p in labels.items():
        write_labels(pairs, p, out / "labels" / f"{name}.jsonl")
        own = slice(n_budget, None) if name == "trained-judge" else slice(None)
        row: dict[str, Any] = {"labels": name, **label_agreement(p[own], gold[own])}
        if name in label_test:
            row["test"] = label_agreement(label_test[name], gold_test)
        if name == "constitution":
            row["test_per_principle"] = per_principle
        kept = relabel(pairs, p)
        pairs_file = write_pairs(kept, out / "pairs" / f"{name}.jsonl")
        run_dpo(sft, pairs_file, out / f"dpo_{name}", dpo_cfg, dpo_method, progress=progress)
        rows[f"DPO on {name} labels"] = {**row, "pairs": len(kept),
                                        **heldout_scores(out / f"dpo_{name}", sft_model, records, safety,
                                                         method.eval_samples)}

    summary: dict[str, Any] = {"sft": str(sft), "rm": None if rm is None else str(rm), "data": str(data),
                               "constitution": [p.__dict__ for p in principles], "judge_labels": n_budget,
                               "method": method.__dict__, "dpo_steps": dpo_cfg.max_steps, "dpo_lr": dpo_cfg.lr,
                               "models": rows}
    if cai:
        summary["cai"] = constitutional_ai(sft, sft_model, judge_model, tok, data, out, principles, records,
                                           safety, sft_cfg, dpo_cfg, method, dpo_method, progress)
        rows.update(summary["cai"].pop("models"))
    write_json(out / "results.json", summary)
    atomic_write_text(out / "report.md", render_feedback_report(summary))
    return summary


def constitutional_ai(sft: str | os.PathLike, sft_model, judge_model, tok, data: Path, out: Path,
                      principles: list[Principle], records: list[dict], safety: list[dict], sft_cfg: TrainConfig,
                      dpo_cfg: TrainConfig, method: FeedbackConfig, dpo_method: DPOConfig | None,
                      progress: bool) -> dict[str, Any]:
    """Critique -> revision -> SFT (SL-CAI), then constitution-labelled pairs of its samples -> DPO (RL-CAI)."""
    train_prompts = list(dict.fromkeys(r["prompt"] for r in load_pairs(data / "prefs_train.jsonl")))
    prompts = random.Random(0).sample(train_prompts, min(method.cai_prompts, len(train_prompts)))
    if (data / "safety_train.jsonl").is_file():
        prompts += [r["prompt"] for _, r in read_jsonl(data / "safety_train.jsonl")]
    rows = critique_revise(sft_model, judge_model, tok, prompts, principles, method.max_new_tokens,
                           samples=method.cai_samples)
    write_pairs(rows, out / "cai" / "revisions.jsonl")
    chats = [_chat(r["question"], r["final"]) for r in rows if r["final"]]
    run_sft(sft, write_pairs(chats, out / "cai" / "sl_cai_train.jsonl"), out / "sl_cai",
            replace(sft_cfg, max_steps=method.cai_steps, warmup_steps=min(sft_cfg.warmup_steps, method.cai_steps // 5),
                    eval_interval=0), SFTConfig(), progress=progress)
    sl_model, _, _ = load_plain_run(out / "sl_cai")
    msgs = [[{"role": "user", "content": x}] for x in prompts]
    samples = sample_responses(sl_model, tok, msgs, 2, max_new_tokens=method.max_new_tokens, seed=1)
    a, b = [s[0] for s in samples], [s[1] for s in samples]
    usable = [i for i in range(len(prompts)) if a[i] and b[i] and a[i] != b[i]]
    p = constitution_preferences(judge_model, tok, [prompts[i] for i in usable], [a[i] for i in usable],
                                 [b[i] for i in usable], principles)["preference"] if usable else []
    world = make_world(0)
    gold = [gold_preference(prompts[i], a[i], b[i], world) for i in usable]
    candidates = [{"prompt": prompts[i], "chosen": a[i], "rejected": b[i], "kind": "-", "rejected_kind": "-"}
                  for i in usable]
    ai_pairs = relabel(candidates, p)
    write_pairs(ai_pairs, out / "cai" / "rl_cai_pairs.jsonl")
    models = {"SL-CAI (SFT on revisions)": heldout_scores(out / "sl_cai", sft_model, records, safety,
                                                          method.eval_samples)}
    if ai_pairs:
        run_dpo(out / "sl_cai", out / "cai" / "rl_cai_pairs.jsonl", out / "rl_cai", dpo_cfg, dpo_method,
                progress=progress)
        models["RL-CAI (DPO on constitution-labelled SL-CAI samples)"] = {
            "labels": "constitution", "pairs": len(ai_pairs), **label_agreement(p, gold),
            **heldout_scores(out / "rl_cai", sft_model, records, safety, method.eval_samples)}
    revised = [r for r in rows if r["revised"]]
    asked = [r for r in rows if r["principle"] is not None]
    return {"prompts": len(prompts), "revision_asked": len(asked), "revised": len(revised),
            "revised_from": {src: sum(r["source"] == src for r in revised) for src in ("rewrite", "sample")},
            "broken_principles": {pr.name: sum(r["principle"] == pr.name for r in asked) for pr in principles},
            "examples": [{k: r[k] for k in ("question", "initial", "principle", "revision", "final")}
                         for r in revised[:6]],
            "models": models}


def _f(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def render_feedback_report(s: dict[str, Any]) -> str:
    """results.json as markdown: labeller agreement and the models trained on each labeller's pairs."""
    lines = ["# AI feedback: who labels the pairs, and what the labels are worth", "",
             f"SFT model {s['sft']}; DPO {s['dpo_steps']} steps at lr {s['dpo_lr']:g} on each labeller's pairs; the "
             f"trained judge learned from {s['judge_labels']} gold-labelled pairs.", "",
             "| model | labels agree with gold (train pairs) | kappa | agree (held-out pairs) | pairs | exact match | "
             "gold reward (greedy) | gold reward (T=1) | KL to SFT | refusals | false refusals | jailbreaks |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in s["models"].items():
        test = r.get("test", {}).get("agreement")
        lines.append(f"| {name} | {_f(r.get('agreement'))} | {_f(r.get('kappa'))} | {_f(test)} | "
                     f"{_f(r.get('pairs'))} | {_f(r['exact_match'])} | {_f(r['gold_reward'])} | "
                     f"{_f(r['gold_reward_sampled'])} | {_f(r['kl'])} | {_f(r['refusal_rate'])} | "
                     f"{_f(r['false_refusal_rate'])} | {_f(r['jailbreak_success'])} |")
    for name, r in s["models"].items():
        if "test_per_principle" in r:
            lines += ["", "Agreement of the constitution labeller with gold on the held-out pairs, one principle at a "
                      "time: " + ", ".join(f"{k} {v:.3f}" for k, v in r["test_per_principle"].items()) + "."]
    if "cai" in s:
        c = s["cai"]
        lines += ["", f"Constitutional AI: {c['prompts']} prompts; the critique found a broken principle in "
                  f"{c['revision_asked']} answers ({', '.join(f'{k} {v}' for k, v in c['broken_principles'].items())})"
                  f" and kept {c['revised']} revisions ({c['revised_from']['rewrite']} rewrites, "
                  f"{c['revised_from']['sample']} fresh samples).", ""]
        for e in c["examples"]:
            lines.append(f"- {e['question']!r}: {e['initial']!r} -> ({e['principle']}) {e['final']!r}")
    return "\n".join(lines) + "\n"
