"""Lesson 11's experiments: chain of thought, test-time compute and RL with a verifiable reward, on the world.

    1. SFT on direct answers vs SFT on worked answers (scratchpad / chain of thought): same questions, same steps
       from the same base model; greedy accuracy on held-out sums and held-out characters' two-hop questions.
    2. Prompting without fine-tuning: zero-shot, k-shot (in-context examples) and zero-shot CoT, on the base
       model (plain text) and on the chat SFT model.
    3. Decoding: greedy vs beam search vs one sample.
    4. Test-time compute: N samples per question, then majority vote (self-consistency), best-of-N by the
       verifier (= pass@N) or by the reward model, and reward-weighted voting, for N = 1, 2, 4, ... 32.
    5. RLVR: GRPO on the sums with the verifier as reward (1 right, 0 wrong), from the CoT SFT model.

Accuracy is `minillm.world.check_answer`: the final answer is checked, the reasoning is free.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from minillm.config import GRPOConfig, ReasoningConfig, SFTConfig, TrainConfig
from minillm.datasets import read_jsonl
from minillm.plots import plot_series
from minillm.reasoning import (
    ZERO_SHOT_COT,
    extract_answer,
    few_shot_messages,
    few_shot_text,
    majority_vote,
    pick_best,
    softmax_weights,
    weighted_vote,
)
from minillm.runs import load_plain_run
from minillm.sampling import beam_search_completions, generate_completions
from minillm.stages.grpo import run_grpo
from minillm.stages.pairs import reward_model_scorer
from minillm.stages.rollout import VERIFIER
from minillm.stages.sft import run_sft
from minillm.utils import atomic_write_text, pick_device
from minillm.world import check_answer, make_world, reasoning_chat

__all__ = [
    "TASKS", "task_rows", "write_format_chats", "chat_prompt_ids", "text_prompt_ids", "answers_of", "accuracy",
    "greedy_responses", "beam_responses", "sample_pool", "scaling_curve", "prompting_table", "PARTS", "run_reasoning",
    "render_report",
]

TASKS = ("addition", "two_hop")


def task_rows(data: str | os.PathLike, task: str, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The rows of data/world/{task}_{split}.jsonl (`minillm.world.addition_examples` / `two_hop_examples`)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    path = Path(data) / f"{task}_{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: regenerate the world files with `python -m minillm world --out "
                                f"{data}` (the reasoning tasks were added in lesson 11)")
    rows = [r for _, r in read_jsonl(path)]
    for line, r in enumerate(rows, 1):
        missing = [k for k in ("question", "direct", "cot", "answer") if k not in r]
        if missing:
            raise ValueError(f"{path}:{line}: missing field(s) {missing}")
    return rows[:limit]


def write_format_chats(rows: list[dict[str, Any]], fmt: str, path: str | os.PathLike) -> Path:
    """An SFT file whose answers are the rows' "direct" or "cot" answers (the same questions either way)."""
    text = "".join(json.dumps({"messages": reasoning_chat(r, fmt)}) + "\n" for r in rows)
    path = Path(path)
    atomic_write_text(path, text)
    return path


def chat_prompt_ids(tok, rows: list[dict[str, Any]], shots: list[tuple[str, str]] = (), suffix: str = ""
                    ) -> list[list[int]]:
    """Chat-templated prompts (optionally with in-context examples and a suffix), ending in the assistant header."""
    return [tok.apply_chat_template(few_shot_messages(shots, r["question"], suffix), add_generation_prompt=True)[0]
            for r in rows]


def text_prompt_ids(tok, rows: list[dict[str, Any]], shots: list[tuple[str, str]] = (), suffix: str = ""
                    ) -> list[list[int]]:
    """Plain-text "Question: .. Answer:" prompts for a base model, which never saw the chat template."""
    return [tok.encode(few_shot_text(shots, r["question"], suffix)) for r in rows]


def answers_of(rows: list[dict[str, Any]], responses: list[str]) -> list[str | None]:
    """The final answer of each response (the last number; for two-hop the last value of the asked attribute)."""
    world = make_world(0)
    out = []
    for r, y in zip(rows, responses):
        values = None if r.get("kind") == "addition" or r.get("attribute") == "age" else world.values(r["attribute"])
        out.append(extract_answer(y, values))
    return out


def accuracy(rows: list[dict[str, Any]], responses: list[str]) -> float:
    """Share of responses whose final answer is right (`check_answer`)."""
    world = make_world(0)
    return sum(bool(check_answer(r["question"], y, world)) for r, y in zip(rows, responses)) / max(len(rows), 1)


def _fits(model, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
    block = model.config.block_size
    long = [i for i, p in enumerate(prompt_ids) if len(p) + max_new_tokens > block]
    if long:
        raise ValueError(f"prompt {long[0]} has {len(prompt_ids[long[0]])} tokens; with max_new_tokens "
                         f"{max_new_tokens} it exceeds the context of {block} tokens (use fewer in-context examples)")


def _first_line(text: str) -> str:
    """A base model goes on after its answer with the next "Question:"; its answer is the first line."""
    return text.split("\n")[0].strip()


@torch.no_grad()
def greedy_responses(model, tok, prompt_ids: list[list[int]], max_new_tokens: int, chat: bool = True) -> list[str]:
    """Greedy decoding until <|end|> (chat), or until <|endoftext|> and then the first line (plain text)."""
    _fits(model, prompt_ids, max_new_tokens)
    outs = generate_completions(model, prompt_ids, max_new_tokens, eos_id=tok.end_id if chat else tok.eot_id,
                                temperature=0.0)
    texts = [tok.decode(o).strip() for o in outs]
    return texts if chat else [_first_line(t) for t in texts]


@torch.no_grad()
def beam_responses(model, tok, prompt_ids: list[list[int]], beam_width: int, max_new_tokens: int,
                   length_penalty: float = 1.0) -> list[str]:
    """Beam search until <|end|> (`minillm.sampling.beam_search`)."""
    _fits(model, prompt_ids, max_new_tokens)
    outs, _ = beam_search_completions(model, prompt_ids, beam_width, max_new_tokens, length_penalty, tok.end_id)
    return [tok.decode(o).strip() for o in outs]


@torch.no_grad()
def sample_pool(model, tok, prompt_ids: list[list[int]], n: int, temperature: float, max_new_tokens: int,
                seed: int = 0) -> list[list[str]]:
    """n samples per prompt at the given temperature, until <|end|>."""
    _fits(model, prompt_ids, max_new_tokens)
    flat = [p for p in prompt_ids for _ in range(n)]
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    outs = generate_completions(model, flat, max_new_tokens, eos_id=tok.end_id, temperature=temperature,
                                generator=gen)
    texts = [tok.decode(o).strip() for o in outs]
    return [texts[i * n:(i + 1) * n] for i in range(len(prompt_ids))]


def scaling_curve(rows: list[dict[str, Any]], pool: list[list[str]], ns: list[int],
                  rm_scores: list[list[float]] | None = None) -> dict[int, dict[str, float]]:
    """Accuracy with N of the pool's samples per question (the first N, so each N extends the previous one).

    majority: self-consistency vote; verifier: best-of-N by the gold checker, i.e. pass@N (is any sample right);
    rm: best-of-N by the reward model; rm_weighted: vote weighted by softmax_i of the reward-model scores.
    """
    world = make_world(0)
    right = [[bool(check_answer(r["question"], y, world)) for y in ys] for r, ys in zip(rows, pool)]
    answers = [answers_of([r] * len(ys), ys) for r, ys in zip(rows, pool)]
    curve = {}
    for n in ns:
        if n > min(len(ys) for ys in pool):
            raise ValueError(f"scaling_curve: N={n} but the pool has only {min(len(ys) for ys in pool)} samples")
        row = {"sample": _mean(r[0] for r in right)}
        row["majority"] = _mean(majority_vote(a[:n])[0] == r["answer"] for a, r in zip(answers, rows))
        row["verifier"] = _mean(any(r[:n]) for r in right)
        if rm_scores is not None:
            row["rm"] = _mean(ok[pick_best(s[:n])] for ok, s in zip(right, rm_scores))
            row["rm_weighted"] = _mean(weighted_vote(a[:n], softmax_weights(s[:n]))[0] == r["answer"]
                                       for a, s, r in zip(answers, rm_scores, rows))
        curve[n] = row
    return curve


def _mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / max(len(xs), 1)


def _n_grid(n_max: int) -> list[int]:
    """1, 2, 4, ... up to n_max (and n_max itself)."""
    ns, n = [], 1
    while n < n_max:
        ns.append(n)
        n *= 2
    return ns + [n_max]


def _shots(train: list[dict[str, Any]], k: int, fmt: str) -> list[tuple[str, str]]:
    """The first k training rows as solved in-context examples."""
    return [(r["question"], r[fmt]) for r in train[:k]]


def _fitting_shots(model, tok, rows, shots, build, max_new_tokens) -> list[tuple[str, str]]:
    """The largest prefix of the examples with which every prompt still leaves room to answer."""
    block = model.config.block_size
    while shots and max(len(p) for p in build(tok, rows, shots)) + max_new_tokens > block:
        shots = shots[:-1]
    return shots


# The prompted models were never trained to write a scratchpad: their answers are one sentence, and a smaller
# answer budget leaves room in the context for in-context examples.
PROMPTING_MAX_NEW_TOKENS = 32


def prompting_table(models: dict[str, tuple[Any, bool]], tok, tests: dict[str, list[dict[str, Any]]],
                    train: dict[str, list[dict[str, Any]]], method: ReasoningConfig) -> list[dict[str, Any]]:
    """Greedy accuracy of each model with zero-shot, k-shot (direct and worked examples) and zero-shot CoT prompts.

    models: name -> (model, chat?); a base model (chat False) gets "Question: .. Answer:" text prompts. Answers get
    min(method.max_new_tokens, PROMPTING_MAX_NEW_TOKENS) tokens; k is cut to what fits the context.
    """
    method = replace(method, max_new_tokens=min(method.max_new_tokens, PROMPTING_MAX_NEW_TOKENS))
    rows = []
    for name, (model, chat) in models.items():
        build = chat_prompt_ids if chat else text_prompt_ids
        for task, test in tests.items():
            variants = {"zero-shot": ([], ""), "zero-shot CoT": ([], ZERO_SHOT_COT)}
            for fmt in ("direct", "cot"):
                shots = _fitting_shots(model, tok, test, _shots(train[task], method.shots, fmt), build,
                                       method.max_new_tokens)
                if shots:
                    variants[f"{len(shots)}-shot ({fmt} examples)"] = (shots, "")
            for variant, (shots, suffix) in variants.items():
                ids = build(tok, test, shots, suffix)
                if max(len(p) for p in ids) + method.max_new_tokens > model.config.block_size:
                    rows.append({"model": name, "task": task, "prompt": variant, "accuracy": None,
                                 "example": "(the prompt leaves no room for the answer in the context)"})
                    continue
                ys = greedy_responses(model, tok, ids, method.max_new_tokens, chat=chat)
                rows.append({"model": name, "task": task, "prompt": variant, "accuracy": accuracy(test, ys),
                             "example": ys[0]})
    return rows


def _eval_model(model, tok, tests, method) -> dict[str, Any]:
    out = {}
    for task, test in tests.items():
        ys = greedy_responses(model, tok, chat_prompt_ids(tok, test), method.max_new_tokens)
        out[task] = {"accuracy": accuracy(test, ys), "answer_tokens": _mean(len(tok.encode(y)) for y in ys),
                     "example": ys[0]}
    return out


PARTS = ("sft", "prompting", "decoding", "scaling", "rlvr")


def run_reasoning(base: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, sft_cfg: TrainConfig,
                  rl_cfg: TrainConfig, method: ReasoningConfig | None = None, chat: str | os.PathLike | None = None,
                  reward: str | os.PathLike | None = None, progress: bool = False,
                  parts: tuple[str, ...] = PARTS) -> dict[str, Any]:
    """The five experiments of the module docstring; writes out/summary.json, out/report.md, out/scaling.png.

    base: the pretrained run both SFT runs start from; chat: the pipeline's chat SFT model (prompting rows);
    reward: a reward-model run (best-of-N and weighted voting by the reward model). Runs go to out/sft_direct,
    out/sft_cot, out/sft_cot_early and out/rlvr. parts: a subset of PARTS re-runs only those experiments, reusing
    out/sft_direct and out/sft_cot and updating the sections of an existing out/summary.json.
    """
    method = method or ReasoningConfig()
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ValueError(f"parts: unknown {unknown}; choose from {list(PARTS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    device = pick_device(sft_cfg.device)
    train = {t: task_rows(data, t, "train") for t in TASKS}
    tests = {"addition": task_rows(data, "addition", "test", method.eval_limit),
             "two_hop": task_rows(data, "two_hop", "test")}
    old = out / "summary.json"
    summary: dict[str, Any] = json.loads(old.read_text()) if set(parts) != set(PARTS) and old.exists() else {}
    summary.update({"method": asdict(method), "sft_steps": sft_cfg.max_steps,
                    "train_questions": {t: len(r) for t, r in train.items()},
                    "test_questions": {t: len(r) for t, r in tests.items()}})

    # 1. the same questions answered directly or worked out, the same SFT recipe
    models, tok = {}, None
    for fmt in ("direct", "cot"):
        if "sft" in parts:
            chats = write_format_chats(train["addition"] + train["two_hop"], fmt, out / f"{fmt}_train.jsonl")
            run = run_sft(base, chats, out / f"sft_{fmt}", sft_cfg, SFTConfig(), progress=progress)
            model, tok, seconds = run.model, run.tokenizer, run.result.seconds
        elif (out / f"sft_{fmt}" / "ckpt.pt").exists():
            model, tok, _ = load_plain_run(out / f"sft_{fmt}")
            seconds = summary.get("sft", {}).get(fmt, {}).get("seconds", float("nan"))
        else:
            raise FileNotFoundError(f"{out / f'sft_{fmt}'}: no SFT run to reuse; run the 'sft' part first")
        models[fmt] = model.to(device).eval()
        # evaluated every time (seconds): a changed max_new_tokens or eval_limit applies to the reused runs too
        summary.setdefault("sft", {})[fmt] = {**_eval_model(models[fmt], tok, tests, method), "seconds": seconds}
    cot = models["cot"]

    # 2. prompting without reasoning fine-tuning
    if "prompting" in parts:
        prompted = {"base (text prompt)": (load_plain_run(base, device=device)[0].eval(), False)}
        if chat is not None:
            prompted["chat SFT model"] = (load_plain_run(chat, device=device)[0].eval(), True)
        summary["prompting"] = prompting_table(prompted, tok, tests, train, method)

    # 3. decoding the CoT model: greedy, beam search, one sample
    if "decoding" in parts:
        summary["decoding"] = {}
        for task, test in tests.items():
            ids = chat_prompt_ids(tok, test)
            sample = [ys[0] for ys in sample_pool(cot, tok, ids, 1, method.temperature, method.max_new_tokens)]
            summary["decoding"][task] = {
                "greedy": accuracy(test, greedy_responses(cot, tok, ids, method.max_new_tokens)),
                f"beam search (W={method.beam_width})": accuracy(test, beam_responses(
                    cot, tok, ids, method.beam_width, method.max_new_tokens, method.length_penalty)),
                f"one sample (T={method.temperature})": accuracy(test, sample),
            }

    # 4. test-time compute: one pool of n_max samples per question, read at N = 1, 2, 4, ...
    if "scaling" in parts:
        summary["scaling"] = _scaling(cot, tok, tests, method, reward, device)
        _plot_scaling(summary["scaling"], _n_grid(method.n_max), out / "scaling.png")

    # 5. RLVR: GRPO on the training sums with the verifier as the reward
    if "rlvr" in parts:
        summary["rlvr"] = _rlvr(base, tok, cot.config.block_size, train, tests, out, sft_cfg, rl_cfg, method, device,
                                progress)
    summary["seconds"] = time.perf_counter() - t0
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out / "report.md", render_report(summary))
    return summary


def _scaling(cot, tok, tests, method: ReasoningConfig, reward, device) -> dict[str, dict[str, dict[str, float]]]:
    scorer = reward_model_scorer(reward, device=str(device)) if reward is not None else None
    curves = {}
    for task, test in tests.items():
        rows = test[:method.pool_limit]
        pool = sample_pool(cot, tok, chat_prompt_ids(tok, rows), method.n_max, method.temperature,
                           method.max_new_tokens)
        rm_scores = None
        if scorer is not None:
            flat = scorer([[{"role": "user", "content": r["question"]}] for r, ys in zip(rows, pool) for _ in ys],
                          [y for ys in pool for y in ys])
            flat = [v if math.isfinite(v) else -1e9 for v in flat]  # NaN: a sample too long for the reward model ranks last
            rm_scores = [flat[i * method.n_max:(i + 1) * method.n_max] for i in range(len(rows))]
        curve = scaling_curve(rows, pool, _n_grid(method.n_max), rm_scores)
        curves[task] = {str(n): v for n, v in curve.items()}
    return curves


def _rlvr(base, tok, block: int, train, tests, out: Path, sft_cfg: TrainConfig, rl_cfg: TrainConfig,
          method: ReasoningConfig, device, progress: bool) -> dict[str, Any]:
    """GRPO with the verifier from a CoT model trained for method.rl_start_steps SFT steps.

    Why not the fully trained CoT model: it is right on nearly every training sum, and a group of samples that
    are all right (or all wrong) has zero advantage, so GRPO would have nothing to learn from.
    """
    # tok and block: the CoT SFT run's, which starts from the same base as the run trained here
    fits = any(len(chat_prompt_ids(tok, [r])[0]) + len(tok.encode(r["cot"])) + 1 <= block for r in train["addition"])
    if not fits:
        return {"skipped": f"no worked sum fits the context of {block} tokens (a preset with a longer context, e.g. "
                           "cpu, runs this part)"}
    chats = write_format_chats(train["addition"], "cot", out / "rlvr_prompts.jsonl")
    start_cfg = replace(sft_cfg, max_steps=method.rl_start_steps, eval_interval=0,
                        warmup_steps=min(sft_cfg.warmup_steps, method.rl_start_steps // 10))
    start = run_sft(base, chats, out / "sft_cot_early", start_cfg, SFTConfig(), progress=progress)
    before = _eval_model(start.model.to(device).eval(), tok, tests, method)
    grpo = GRPOConfig(max_new_tokens=method.max_new_tokens, group_size=method.rl_group_size,
                      temperature=method.temperature)
    rl = run_grpo(out / "sft_cot_early", VERIFIER, chats, out / "rlvr", rl_cfg, grpo, progress=progress)
    after = _eval_model(rl.model.to(device).eval(), tok, tests, method)
    rows = [json.loads(x) for x in (out / "rlvr" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rollouts = [m for m in rows if "objective/scores" in m]
    return {"start_steps": method.rl_start_steps, "rl_steps": rl_cfg.max_steps,
            "before": {t: before[t]["accuracy"] for t in TASKS}, "after": {t: after[t]["accuracy"] for t in TASKS},
            "answer_tokens_before": before["addition"]["answer_tokens"],
            "answer_tokens_after": after["addition"]["answer_tokens"],
            "rollout_reward": [m["objective/scores"] for m in rollouts],
            "rollout_length": [m["response/length"] for m in rollouts],
            "zero_spread_groups": [m["frac_reward_zero_std"] for m in rollouts],
            "sft_seconds": start.result.seconds, "rl_seconds": rl.result.seconds}


def _plot_scaling(scaling: dict[str, dict[str, dict[str, float]]], ns: list[int], png: Path) -> None:
    series = {}
    for task, curve in scaling.items():
        for key in curve[str(ns[0])]:
            if key != "sample":
                series[f"{task}: {key}"] = [curve[str(n)][key] for n in ns]
    plot_series(ns, series, png, xlabel="N samples per question", title="Test-time compute (accuracy)")


def _pct(x: float | None) -> str:
    return "does not fit" if x is None else f"{x:.3f}"


def render_report(s: dict[str, Any]) -> str:
    """The report card of lesson 11 as markdown tables (the sections of the parts that have run)."""
    lines = ["# Reasoning and test-time compute (lesson 11)", "",
             f"Held-out questions: {s['test_questions']['addition']} sums of held-out operands, "
             f"{s['test_questions']['two_hop']} two-hop questions about held-out characters. "
             f"SFT: {s['sft_steps']} steps on {sum(s['train_questions'].values())} questions.", ""]
    if "sft" in s:
        lines += ["## 1. SFT on direct vs worked answers (greedy accuracy)", "",
                  "| SFT answers | addition | two-hop | answer tokens (addition) | train seconds |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {fmt} | {_pct(r['addition']['accuracy'])} | {_pct(r['two_hop']['accuracy'])} | "
                  f"{r['addition']['answer_tokens']:.1f} | {r['seconds']:.0f} |" for fmt, r in s["sft"].items()]
        lines.append("")
    if "prompting" in s:
        lines += ["## 2. Prompting without reasoning fine-tuning (greedy accuracy)", "",
                  "| model | task | prompt | accuracy |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['model']} | {r['task']} | {r['prompt']} | {_pct(r['accuracy'])} |" for r in s["prompting"]]
        lines.append("")
    if "decoding" in s:
        names = list(next(iter(s["decoding"].values())))
        lines += ["## 3. Decoding the CoT model (accuracy)", "", "| task | " + " | ".join(names) + " |",
                  "| --- |" + " --- |" * len(names)]
        lines += [f"| {t} | " + " | ".join(_pct(v) for v in d.values()) + " |" for t, d in s["decoding"].items()]
        lines.append("")
    if "scaling" in s:
        lines += ["## 4. Test-time compute: accuracy with N samples per question (CoT model)", ""]
        for task, curve in s["scaling"].items():
            keys = list(next(iter(curve.values())))
            lines += [f"**{task}**", "", "| N | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
            lines += [f"| {n} | " + " | ".join(_pct(v[k]) for k in keys) + " |" for n, v in curve.items()]
            lines.append("")
    if "rlvr" in s and "skipped" in s["rlvr"]:
        lines += ["## 5. RLVR", "", f"Skipped: {s['rlvr']['skipped']}.", ""]
    elif "rlvr" in s:
        r = s["rlvr"]
        lines += [f"## 5. RLVR: GRPO with the verifier as reward (sums), from a CoT model after {r['start_steps']} SFT "
                  f"steps, {r['rl_steps']} GRPO steps", "",
                  "| | addition | two-hop | answer tokens (addition) |", "| --- | --- | --- | --- |",
                  f"| before | {_pct(r['before']['addition'])} | {_pct(r['before']['two_hop'])} | "
                  f"{r['answer_tokens_before']:.1f} |",
                  f"| after | {_pct(r['after']['addition'])} | {_pct(r['after']['two_hop'])} | "
                  f"{r['answer_tokens_after']:.1f} |", ""]
        if r["rollout_reward"]:
            lines += [f"Rollout reward (share of right answers) first -> last: {r['rollout_reward'][0]:.3f} -> "
                      f"{r['rollout_reward'][-1]:.3f}; mean response tokens {r['rollout_length'][0]:.1f} -> "
                      f"{r['rollout_length'][-1]:.1f}; groups with zero spread {r['zero_spread_groups'][0]:.2f} -> "
                      f"{r['zero_spread_groups'][-1]:.2f}.", ""]
    lines += [f"Total: {s['seconds']:.0f} s.", ""]
    return "\n".join(lines)
