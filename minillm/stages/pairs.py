"""On-policy preference pairs: sample N responses per prompt, score them, keep the best and the worst.

For each prompt x, with the current policy pi and a scorer R (the world's gold reward, or a reward model):

    y_1 .. y_N ~ pi(. | x)           s_i = R(x, y_i)
    chosen = y_argmax s,  rejected = y_argmin s        skipped when max_i s_i = min_i s_i (a tie says nothing)

The pairs are written in the preference JSONL format that `minillm reward` and `minillm dpo` read, so
sample -> score -> DPO -> sample again is the iterative alignment loop of Llama 2 (Touvron et al., 2023:
rejection sampling on reward-model scores) and Llama 3 (Dubey et al., 2024: each round's DPO pairs come
from the latest policy's samples) in small. Unlike the fixed prefs_train pairs, these pairs lie where
the policy actually puts its probability mass, which is where DPO's gradient acts.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from minillm.align.chat import record_to_messages
from minillm.align.preferences import Messages, prompt_text
from minillm.align.reward import score_sequences
from minillm.config import PairsConfig
from minillm.datasets import read_jsonl
from minillm.runs import load_plain_run, load_reward_model
from minillm.sampling import generate_completions
from minillm.utils import atomic_write_text
from minillm.world import gold_reward, make_world

__all__ = [
    "read_prompts", "sample_responses", "gold_scorer", "reward_model_scorer", "best_worst_pairs", "write_pairs",
    "run_pairs",
]

Scorer = Callable[[list[Messages], list[str]], list[float]]


def read_prompts(path: str | os.PathLike) -> list[tuple[Messages, dict[str, Any]]]:
    """(prompt messages, extra fields) per record of a JSONL file.

    A record gives its prompt as "prompt" (str or messages, e.g. a preference file) or as a chat ("messages",
    or Alpaca "instruction"/"input"/"output", e.g. an SFT file), whose prompt is everything before its final
    assistant turn(s). Extra fields (e.g. "kind") are kept and copied into the written pairs.
    """
    path = Path(path)
    out = []
    for line, record in read_jsonl(path):
        where = f"{path}:{line}"
        if "prompt" in record:
            p = record["prompt"]
            if isinstance(p, str):
                if not p.strip():
                    raise ValueError(f"{where}: 'prompt' is empty")
                messages = [{"role": "user", "content": p}]
            elif isinstance(p, list) and p and all(isinstance(m, dict) and m.get("content") for m in p):
                messages = [{"role": m["role"], "content": m["content"]} for m in p]
            else:
                raise ValueError(f"{where}: 'prompt' must be a non-empty string or list of messages")
        else:
            messages = list(record_to_messages(record, where))
            while messages and messages[-1]["role"] == "assistant":
                messages.pop()
        if not messages or messages[-1]["role"] != "user":
            raise ValueError(f"{where}: the prompt must end with a user message")
        extra = {k: v for k, v in record.items()
                 if k not in ("prompt", "messages", "chosen", "rejected", "instruction", "input", "output")}
        out.append((messages, extra))
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


@torch.no_grad()
def sample_responses(policy: torch.nn.Module, tokenizer, prompts: list[Messages], n: int, temperature: float = 1.0,
                     top_k: int | None = None, top_p: float | None = None, max_new_tokens: int = 48, seed: int = 0,
                     batch_size: int = 64) -> list[list[str]]:
    """N sampled responses (text, stripped) per prompt, generated in the chat template until <|end|>."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    device = next(policy.parameters()).device
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True)[0] for p in prompts for _ in range(n)]
    gen = torch.Generator(device=device).manual_seed(seed)
    outs = generate_completions(policy, ids, max_new_tokens, eos_id=tokenizer.end_id, batch_size=batch_size,
                                temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
    texts = [tokenizer.decode(o).strip() for o in outs]
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def gold_scorer(world=None) -> Scorer:
    """Scores with the world's hand-written gold reward r(x, y) (`minillm.world.gold_reward`)."""
    world = world if world is not None else make_world(0)

    def score(prompts: list[Messages], responses: list[str]) -> list[float]:
        return [gold_reward(prompt_text(p), y, world) for p, y in zip(prompts, responses)]

    return score


def reward_model_scorer(run_dir: str | os.PathLike, device: str = "auto") -> Scorer:
    """Scores with a trained reward model, normalised by its stored offset; NaN for a pair that does not fit."""
    rm, tok, cfg = load_reward_model(run_dir, device=device)
    offset = float(cfg.get("reward_offset", 0.0))
    block = rm.backbone.config.block_size

    def score(prompts: list[Messages], responses: list[str]) -> list[float]:
        seqs = [tok.apply_chat_template(p + [{"role": "assistant", "content": y}])[0]
                for p, y in zip(prompts, responses)]
        fits = [i for i, s in enumerate(seqs) if len(s) <= block]
        out = [float("nan")] * len(seqs)
        if fits:
            r = score_sequences(rm, [seqs[i] for i in fits], tok.pad_id) - offset
            for i, v in zip(fits, r.tolist()):
                out[i] = v
        return out

    return score


def best_worst_pairs(prompts: list[Messages], responses: list[list[str]], scores: list[list[float]],
                     extras: list[dict[str, Any]] | None = None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """One preference row per prompt: its best-scored response as chosen, its worst as rejected.

    Empty responses and NaN scores are not candidates. A prompt is skipped (and counted) when fewer than two
    candidates remain ("too_few") or when the best and worst scores are equal ("ties"). The prompt is written
    as a string when it is a single user turn, else as its messages.
    """
    rows, ties, too_few, empty = [], 0, 0, 0
    extras = extras or [{} for _ in prompts]
    for p, ys, ss, extra in zip(prompts, responses, scores, extras):
        cands = [(s, y) for y, s in zip(ys, ss) if y.strip() and s == s]  # s == s drops NaN
        empty += sum(1 for y in ys if not y.strip())
        if len(cands) < 2:
            too_few += 1
            continue
        best = max(cands, key=lambda c: c[0])
        worst = min(cands, key=lambda c: c[0])
        if best[0] == worst[0]:
            ties += 1
            continue
        prompt = p[0]["content"] if len(p) == 1 else p
        rows.append({"prompt": prompt, "chosen": best[1], "rejected": worst[1], "chosen_score": best[0],
                     "rejected_score": worst[0], **extra})
    return rows, {"prompts": len(prompts), "pairs": len(rows), "ties": ties, "too_few": too_few,
                  "empty_responses": empty}


def write_pairs(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write rows as JSONL atomically (a temporary file, then a rename)."""
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def run_pairs(init: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike,
              method: PairsConfig | None = None, scorer: str = "gold", device: str = "auto") -> dict[str, Any]:
    """Sample method.n responses per prompt of `data` from the policy run `init`, score them ("gold" or a
    reward-model run directory), write the best/worst pairs to `out`; returns the counts and the mean
    chosen/rejected scores."""
    method = method or PairsConfig()
    records = read_prompts(data)[:method.limit]
    if scorer == "gold":
        score = gold_scorer()
    elif Path(scorer).is_dir():
        score = reward_model_scorer(scorer, device=device)
    else:
        raise ValueError(f"scorer must be 'gold' or a reward-model run directory, got {scorer!r} (no such directory)")
    policy, tok, _ = load_plain_run(init, device=device)
    prompts = [p for p, _ in records]
    n = method.n
    responses = sample_responses(policy, tok, prompts, n, temperature=method.temperature,
                                 max_new_tokens=method.max_new_tokens, seed=method.seed)
    flat_p = [p for p, ys in zip(prompts, responses) for _ in ys]
    flat_y = [y for ys in responses for y in ys]
    flat_s = score(flat_p, flat_y)
    scores = [flat_s[i * n:(i + 1) * n] for i in range(len(prompts))]
    extras = [{**extra, "scorer": str(scorer)} for _, extra in records]
    rows, stats = best_worst_pairs(prompts, responses, scores, extras)
    if not rows:
        raise ValueError(f"no pair written: all {len(prompts)} prompts were ties or had fewer than 2 responses")
    write_pairs(rows, out)
    stats.update(chosen_score=sum(r["chosen_score"] for r in rows) / len(rows),
                 rejected_score=sum(r["rejected_score"] for r in rows) / len(rows), out=str(out))
    return stats
