"""Data loading and batching. Every loader validates its input and names `file:line` on a bad record.

Pretraining batches are random windows of the tokenised corpus: x = ids[i : i + T], y = ids[i + 1 : i + T + 1],
so position t of x is trained to predict y[t], the token that follows it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file; a clear error when it is missing, not UTF-8, or empty."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e})") from e
    if not text.strip():
        raise ValueError(f"{path}: the corpus is empty")
    return text


def split_documents(text: str) -> list[str]:
    """Documents are separated by a blank line."""
    return [d.strip() for d in text.split("\n\n") if d.strip()]


def tokenize_corpus(path: str | os.PathLike, tokenizer) -> torch.Tensor:
    """All documents of a text file as one 1-D id tensor, each followed by <|endoftext|>."""
    docs = split_documents(read_text(path))
    ids: list[int] = []
    for doc_ids in tokenizer.encode_batch(docs):
        ids.extend(doc_ids)
        ids.append(tokenizer.eot_id)
    return torch.tensor(ids, dtype=torch.long)


def random_windows(ids: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator) -> dict:
    """batch_size random (x, y) windows of length block_size; y is x shifted left by one."""
    if ids.numel() < block_size + 1:
        raise ValueError(f"corpus has {ids.numel()} tokens, fewer than block_size + 1 = {block_size + 1}")
    starts = torch.randint(0, ids.numel() - block_size, (batch_size,), generator=generator)
    offsets = torch.arange(block_size + 1)
    windows = ids[starts[:, None] + offsets[None, :]]  # (B, T + 1)
    return {"input_ids": windows[:, :-1], "targets": windows[:, 1:]}


def _no_constant(name: str) -> float:
    """json.loads reads NaN, Infinity and -Infinity by default; a data file with one would train to NaN."""
    raise ValueError(f"a non-finite number ({name}) is not allowed")


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-blank line; a malformed line (invalid JSON or UTF-8, not an object, a
    NaN or Infinity) raises `path:line: reason`. A UTF-8 byte-order mark at the start is skipped."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                 f"{e.start + 1})") from e
            if not line.strip():
                continue
            try:
                record = json.loads(line, parse_constant=_no_constant)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from e
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record
