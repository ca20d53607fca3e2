"""SFT data: chat records (messages or Alpaca) -> (ids, loss_mask) through the chat template -> padded batches.

The loss these batches feed is `minillm.align.sft.sft_loss`. A record is either {"messages": [{role,
content}, ...]} or Alpaca's {"instruction", "input", "output"}; the chat template marks the assistant's
tokens with loss_mask = 1 (`Tokenizer.apply_chat_template`), and `collate` turns the mask into targets
equal to `IGNORE_INDEX` (-100) wherever no loss is taken.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from minillm.align.sft import shift_for_next_token
from minillm.datasets import read_jsonl
from minillm.tokenizer import ROLE_TOKENS

ALPACA_FIELDS = ("instruction", "output")


def alpaca_to_messages(record: dict) -> list[dict[str, str]]:
    """An Alpaca record {instruction, input, output} as a two-turn chat.

    The user turn is the instruction, followed by a blank line and the input when there is one (the
    Stanford Alpaca prompt puts them in separate sections; the chat template marks the roles instead).
    """
    instruction, output = record["instruction"], record["output"]
    extra = record.get("input") or ""
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def record_to_messages(record: dict, where: str) -> list[dict[str, str]]:
    """`messages` records pass through; Alpaca records are converted; anything else is an error at `where`.

    Every message must be a {role, content} dict with a known role and non-empty text, as
    `Tokenizer.apply_chat_template` requires; checking here lets the error name the file and line (`where`).
    A prompt-only chat (no assistant turn) passes; `load_chats` refuses it for training.
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return _check_chat(record["messages"], where)
    if all(k in record for k in ALPACA_FIELDS):
        for k in ALPACA_FIELDS:
            if not isinstance(record[k], str) or not record[k].strip():
                raise ValueError(f"{where}: Alpaca field {k!r} must be a non-empty string")
        if not isinstance(record.get("input") or "", str):
            raise ValueError(f"{where}: Alpaca field 'input' must be a string, got {type(record['input']).__name__}")
        return alpaca_to_messages(record)
    raise ValueError(f"{where}: expected 'messages' or Alpaca fields 'instruction', 'input', 'output'; "
                     f"got fields {sorted(record)}")


def _check_chat(messages: object, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: message {i} needs 'role' and 'content'")
        if m["role"] not in ROLE_TOKENS:
            raise ValueError(f"{where}: message {i} has unknown role {m['role']!r}; use one of {list(ROLE_TOKENS)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}: message {i} ({m['role']}) content must be a string, "
                             f"got {type(m['content']).__name__}")
        if not m["content"].strip():
            raise ValueError(f"{where}: message {i} ({m['role']}) has empty content")
    return messages


def _trainable(messages: list[dict[str, str]], where: str) -> list[dict[str, str]]:
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: the conversation has no assistant turn, so there is nothing to train on")
    return messages


def load_chats(path: str | os.PathLike) -> list[list[dict[str, str]]]:
    """Training conversations from JSONL (one record per line) or JSON (a list of records), messages or Alpaca.

    Each must hold at least one assistant turn; errors name the file and line (JSONL) or record (JSON)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    if path.suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
        if not isinstance(records, list):
            raise ValueError(f"{path}: a .json SFT file must hold a list of records")
        chats = [_trainable(record_to_messages(r, f"{path}: record {i}"), f"{path}: record {i}")
                 for i, r in enumerate(records)]
    else:
        chats = [_trainable(record_to_messages(r, f"{path}:{line}"), f"{path}:{line}") for line, r in read_jsonl(path)]
    if not chats:
        raise ValueError(f"{path}: no conversations")
    return chats


@dataclass
class SFTExample:
    ids: list[int]
    loss_mask: list[int]


def encode_chats(tokenizer, chats: list[list[dict[str, str]]], block_size: int) -> tuple[list[SFTExample], int]:
    """Render every chat with the chat template; drop (and count) the ones longer than block_size + 1.

    An over-long chat is dropped rather than truncated: cutting the end would cut the answer, the only
    part that is trained on. block_size + 1 tokens give block_size (input, target) positions.
    """
    examples, dropped = [], 0
    for chat in chats:
        ids, mask = tokenizer.apply_chat_template(chat)
        if len(ids) > block_size + 1:
            dropped += 1
            continue
        examples.append(SFTExample(ids, mask))
    return examples, dropped


def collate(examples: list[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; pad positions are never predicted (target -100).

    Returns input_ids (B, T-1), targets (B, T-1) and attention_mask (B, T-1) with T the longest example.
    """
    if not examples:
        raise ValueError("collate: no examples")
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    attn = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = torch.tensor(e.loss_mask)
        attn[i, : len(e.ids)] = 1
    inputs, targets = shift_for_next_token(ids, mask)
    return {"input_ids": inputs, "targets": targets, "attention_mask": attn[:, :-1]}


def pack(examples: list[SFTExample], block_size: int) -> list[SFTExample]:
    """Concatenate consecutive examples into rows of at most block_size + 1 tokens (greedy packing).

    The loss mask stays right (each example keeps its own mask), but attention is *not* blocked between
    examples packed into one row: a later example can attend to an earlier one's tokens. That is the
    usual cheap packing (no document mask); the lesson discusses what it lets examples see.
    """
    rows: list[SFTExample] = []
    ids: list[int] = []
    mask: list[int] = []
    for i, e in enumerate(examples):
        if len(e.ids) > block_size + 1:
            raise ValueError(f"pack: example {i} has {len(e.ids)} tokens > block_size + 1 = {block_size + 1} "
                             "(drop it first, as encode_chats does)")
        if ids and len(ids) + len(e.ids) > block_size + 1:
            rows.append(SFTExample(ids, mask))
            ids, mask = [], []
        ids, mask = ids + e.ids, mask + e.loss_mask
    if ids:
        rows.append(SFTExample(ids, mask))
    return rows


def all_tokens_mask(examples: list[SFTExample]) -> list[SFTExample]:
    """The masking ablation: train on every token (prompt and role tokens too), not just the response."""
    return [SFTExample(e.ids, [1] * len(e.ids)) for e in examples]


def sample_batches(examples: list[SFTExample], batch_size: int, pad_id: int):
    """A get_batch(split, generator) for the training loop: uniform random examples per batch."""
    if not examples:
        raise ValueError("SFT: no training examples left (all dropped as too long?)")

    def get_batch(split: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, len(examples), (batch_size,), generator=gen).tolist()
        return collate([examples[i] for i in idx], pad_id)

    return get_batch
