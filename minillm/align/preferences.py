"""Preference data for the reward model and DPO: (x, y_w, y_l) records -> chat tokens -> [chosen; rejected] batches.

A preference record says that for prompt x the response y_w ("chosen") is preferred to y_l ("rejected").
Both stages read it the same way (the Bradley-Terry model, Bradley & Terry, 1952; Ouyang et al., 2022):

    P(y_w > y_l | x) = sigma(r(x, y_w) - r(x, y_l))        reward model: r is a learned scalar head
                                                           DPO: r = beta log pi(y|x) / pi_ref(y|x)

Record formats (TRL's preference formats, one JSON object per line):

    standard        {"prompt": str, "chosen": str, "rejected": str}
    conversational  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}; chosen/rejected may
                    repeat the prompt's messages first (UltraFeedback does), those are stripped
    implicit prompt {"chosen": [messages], "rejected": [messages]}: the shared leading messages are the prompt
    optional        "margin": a number (the Bradley-Terry margin of Llama 2); other fields are kept as `meta`

Each side is rendered with the chat template, prompt as user turn(s) and response as assistant turn(s):

    ids  = <|user|> x <|end|> <|assistant|> y <|end|>
    mask =    0     0    0          0       1    1        (1 = response token: what DPO scores)

so the reward model reads the closing <|end|> of the response (its last real token), and DPO's log pi(y|x)
includes the end of the turn, as TRL appends EOS. A batch of B pairs is ONE tensor of 2B rows, [chosen; rejected]
(the `concatenated_forward` of TRL), right-padded; rows i and B + i are pair i.

Bad records raise `path:line: reason`. A pair whose chosen equals its rejected carries no preference: it is
skipped and counted. A pair longer than the context is dropped and counted (cutting it would cut the responses,
the only part that is compared).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from minillm.datasets import read_jsonl
from minillm.utils import atomic_write_text

__all__ = [
    "PreferencePair", "EncodedPair", "parse_preference", "read_preferences", "encode_pair",
    "encode_preferences", "collate_pairs", "pair_batches", "split_pairs", "prompt_text", "response_text",
    "disable_dropout", "BatchMetricLog",
]

Messages = list[dict[str, str]]


@dataclass
class PreferencePair:
    """One comparison: prompt messages, and the chosen and rejected assistant messages that follow them."""

    prompt: Messages
    chosen: Messages
    rejected: Messages
    margin: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class EncodedPair:
    """Token ids and response masks of both sides of a pair (each side: prompt ++ response)."""

    chosen_ids: list[int]
    chosen_mask: list[int]
    rejected_ids: list[int]
    rejected_mask: list[int]
    margin: float | None = None


# ------------------------------------------------------------------------------------ parsing records
def _as_messages(value: Any, name: str, where: str, default_role: str) -> Messages:
    """A str becomes one message of `default_role`; a list must hold {role, content} dicts with text."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: {name!r} is empty")
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: {name!r} must be a non-empty string or a non-empty list of messages")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: {name!r} message {i} needs 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"{where}: {name!r} message {i} has unknown role {m['role']!r}")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise ValueError(f"{where}: {name!r} message {i} ({m['role']}) has empty content")
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def _common_prefix(a: Messages, b: Messages) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _response(messages: Messages, name: str, where: str) -> Messages:
    if not messages or any(m["role"] != "assistant" for m in messages):
        raise ValueError(f"{where}: {name!r} must continue the prompt with assistant message(s) only")
    return messages


def parse_preference(record: dict[str, Any], where: str) -> PreferencePair:
    """A PreferencePair from one record (formats in the module docstring); ValueError `where: reason`."""
    for name in ("chosen", "rejected"):
        if name not in record:
            raise ValueError(f"{where}: missing field {name!r} (a preference record needs prompt, chosen, rejected)")
    if "prompt" in record:
        prompt = _as_messages(record["prompt"], "prompt", where, "user")
        if prompt[-1]["role"] == "assistant":
            raise ValueError(f"{where}: 'prompt' must not end with an assistant message")
        sides = []
        for name in ("chosen", "rejected"):
            msgs = _as_messages(record[name], name, where, "assistant")
            if msgs[: len(prompt)] == prompt:  # UltraFeedback style: the side repeats the prompt
                msgs = msgs[len(prompt):]
            sides.append(_response(msgs, name, where))
    else:
        if isinstance(record["chosen"], str) or isinstance(record["rejected"], str):
            raise ValueError(f"{where}: missing field 'prompt' (needed when chosen/rejected are strings)")
        chosen = _as_messages(record["chosen"], "chosen", where, "assistant")
        rejected = _as_messages(record["rejected"], "rejected", where, "assistant")
        n = _common_prefix(chosen, rejected)
        while n > 0 and chosen[n - 1]["role"] == "assistant":  # the prompt ends on a user turn
            n -= 1
        if n == 0:
            raise ValueError(f"{where}: missing field 'prompt' and chosen/rejected share no leading user turn")
        prompt = chosen[:n]
        sides = [_response(chosen[n:], "chosen", where), _response(rejected[n:], "rejected", where)]
    margin = record.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise ValueError(f"{where}: 'margin' must be a number, got {margin!r}")
    meta = {k: v for k, v in record.items() if k not in ("prompt", "chosen", "rejected", "margin")}
    return PreferencePair(prompt, sides[0], sides[1], None if margin is None else float(margin), meta)


def read_preferences(path: str | os.PathLike) -> tuple[list[PreferencePair], dict[str, int]]:
    """Every pair of a JSONL file, and counts {"records", "pairs", "identical_skipped"}.

    A pair whose chosen equals its rejected is skipped (it teaches nothing and would sit at loss log 2 forever).
    """
    path = Path(path)
    pairs, identical, records = [], 0, 0
    for line, record in read_jsonl(path):
        records += 1
        pair = parse_preference(record, f"{path}:{line}")
        if pair.chosen == pair.rejected:
            identical += 1
            continue
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"{path}: no usable preference pairs ({records} records, {identical} with chosen == rejected)")
    return pairs, {"records": records, "pairs": len(pairs), "identical_skipped": identical}


def prompt_text(pair_or_prompt: PreferencePair | Messages) -> str:
    """The last user message of the prompt: what the world's gold reward parses."""
    prompt = pair_or_prompt.prompt if isinstance(pair_or_prompt, PreferencePair) else pair_or_prompt
    users = [m["content"] for m in prompt if m["role"] == "user"]
    if not users:
        raise ValueError("prompt_text: the prompt has no user message")
    return users[-1]


def response_text(messages: Messages) -> str:
    """The text of assistant message(s), joined by newlines."""
    return "\n".join(m["content"] for m in messages)


# ------------------------------------------------------------------------------------ tokens
def _encode_side(tokenizer, prompt: Messages, response: Messages) -> tuple[list[int], list[int]]:
    ids, mask = tokenizer.apply_chat_template(prompt + response)
    # The template marks every assistant turn; only the response's turns are scored, not earlier ones in x.
    n_prompt = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True)[0]) - 1  # minus <|assistant|>
    return ids, [0] * n_prompt + mask[n_prompt:]


def encode_pair(tokenizer, pair: PreferencePair) -> EncodedPair:
    """Chat-template ids and response masks of both sides of a pair."""
    c_ids, c_mask = _encode_side(tokenizer, pair.prompt, pair.chosen)
    r_ids, r_mask = _encode_side(tokenizer, pair.prompt, pair.rejected)
    return EncodedPair(c_ids, c_mask, r_ids, r_mask, pair.margin)


def encode_preferences(tokenizer, pairs: list[PreferencePair], block_size: int) -> tuple[list[EncodedPair], int]:
    """Encode every pair; drop (and count) those with a side longer than block_size tokens."""
    encoded, dropped = [], 0
    for pair in pairs:
        e = encode_pair(tokenizer, pair)
        if max(len(e.chosen_ids), len(e.rejected_ids)) > block_size:
            dropped += 1
            continue
        encoded.append(e)
    return encoded, dropped


def collate_pairs(pairs: list[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of 2B rows, [chosen_1..chosen_B; rejected_1..rejected_B].

    Returns input_ids, attention_mask (1 on real tokens) and loss_mask (1 on response tokens), all (2B, T),
    and margin (B,) when every pair has one.
    """
    if not pairs:
        raise ValueError("collate_pairs: no pairs")
    rows = [(p.chosen_ids, p.chosen_mask) for p in pairs] + [(p.rejected_ids, p.rejected_mask) for p in pairs]
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (2B, T)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)  # (2B, T)
    loss_mask = torch.zeros((len(rows), T), dtype=torch.long)  # (2B, T)
    for i, (ids, mask) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        loss_mask[i, : len(ids)] = torch.tensor(mask)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
    if all(p.margin is not None for p in pairs):
        batch["margin"] = torch.tensor([p.margin for p in pairs], dtype=torch.float32)  # (B,)
    return batch


def pair_batches(pairs: list[EncodedPair], batch_size: int, pad_id: int) -> Callable[[str, torch.Generator], dict]:
    """A get_batch(split, generator) for `minillm.train`: batch_size pairs drawn uniformly at random.

    The batch also holds "index" (B,), the drawn pairs' positions in `pairs` (DPO looks up precomputed
    reference log-probs with it).
    """
    if not pairs:
        raise ValueError("no preference pairs to train on (all dropped as too long?)")

    def get_batch(split: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
        index = torch.randint(0, len(pairs), (batch_size,), generator=gen)  # (B,)
        return {**collate_pairs([pairs[i] for i in index.tolist()], pad_id), "index": index}

    return get_batch


def split_pairs(pairs: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): a seeded shuffle, then the first val_fraction (at least 1) as validation; none if < 20 pairs."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    pairs = list(pairs)
    random.Random(seed).shuffle(pairs)
    n_val = max(1, int(len(pairs) * val_fraction)) if val_fraction > 0 and len(pairs) >= 20 else 0
    return pairs[n_val:], pairs[:n_val]


# ------------------------------------------------------------------------------------ models
@dataclass
class PreparedPairs:
    """Preference pairs read, split and encoded for a training stage, with what was skipped or dropped."""

    train_pairs: list[PreferencePair]
    train: list[EncodedPair]
    val: list[EncodedPair]
    stats: dict[str, int]


def prepare_pairs(tokenizer, path: str | os.PathLike, block_size: int, val_fraction: float, seed: int,
                  stage: str) -> PreparedPairs:
    """Read `path`, hold out val_fraction, encode both splits; pairs longer than block_size are dropped.

    Skipped identical pairs and dropped over-long pairs are printed (as `[stage] ...`) and counted in stats.
    """
    pairs, stats = read_preferences(path)
    if stats["identical_skipped"]:
        print(f"[{stage}] skipped {stats['identical_skipped']} pairs whose chosen equals rejected")
    train_pairs, val_pairs = split_pairs(pairs, val_fraction, seed)
    train, dropped = encode_preferences(tokenizer, train_pairs, block_size)
    val, dropped_val = encode_preferences(tokenizer, val_pairs, block_size)
    if dropped + dropped_val:
        print(f"[{stage}] dropped {dropped + dropped_val} pairs longer than block_size = {block_size} tokens")
    stats = {**stats, "dropped_too_long": dropped + dropped_val, "train_pairs": len(train), "val_pairs": len(val)}
    return PreparedPairs(train_pairs, train, val, stats)


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Set p = 0 in every dropout layer (TRL's `disable_dropout=True` for reward and DPO training).

    Dropout would make log pi(y|x) and r(x, y) random, so chosen and rejected (or policy and reference)
    would be compared under different masks.
    """
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


# ------------------------------------------------------------------------------------ training metrics
class BatchMetricLog:
    """Per-batch metrics that a stage's loss_fn records during `minillm.train`, merged into metrics.jsonl after.

    The generic loop logs the loss; TRL's reward and DPO trainers also log accuracies, margins and rewards,
    averaged over the batches since the previous log line. `record` is called from the loss_fn (training
    batches while model.training, validation batches otherwise); `merge_into` adds, to each line the loop
    wrote, the mean of the training batches of its logging window and, prefixed "val_", the mean of the
    batches of the validation estimate written on that line.
    """

    def __init__(self) -> None:
        self.train: list[dict[str, float]] = []
        self.val: list[dict[str, float]] = []

    def record(self, training: bool, metrics: dict[str, float]) -> None:
        (self.train if training else self.val).append(metrics)

    def merge_into(self, metrics_path: str | os.PathLike, grad_accum: int, eval_iters: int,
                   first_step: int = 0) -> None:
        """Rewrite metrics_path (atomically) with the recorded means; first_step > 0 when training resumed."""
        path = Path(metrics_path)
        if not path.exists():
            return
        by_step: dict[int, list[dict[str, float]]] = {}
        for i, m in enumerate(self.train):  # micro-batch i belongs to optimiser step first_step + i // grad_accum + 1
            by_step.setdefault(first_step + i // grad_accum + 1, []).append(m)
        val_groups = [self.val[k:k + eval_iters] for k in range(0, len(self.val), eval_iters)]
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        prev, k = first_step, 0
        for row in rows:
            if row.get("step", 0) <= first_step:
                continue
            if "loss" in row:
                window = [m for s in range(prev + 1, row["step"] + 1) for m in by_step.get(s, [])]
                row.update(_mean_dicts(window))
                prev = row["step"]
            if "val_loss" in row and k < len(val_groups):
                row.update({f"val_{key}": v for key, v in _mean_dicts(val_groups[k]).items()})
                k += 1
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _mean_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    if not dicts:
        return {}
    return {key: sum(d[key] for d in dicts) / len(dicts) for key in dicts[0]}
