"""Supervised fine-tuning (SFT) loss: next-token cross-entropy on the response tokens only.

For a chat or instruction example x = (prompt, response) the model is trained to predict each response
token from everything before it (Ouyang et al., 2022, "Training language models to follow instructions
with human feedback"; Radford et al., 2018 for the language-modelling objective):

    L = - sum_{t in R} log p_theta(x_t | x_<t)        R = positions of response tokens
    log p_theta(x_t | x_<t) = z_{t-1}[x_t] - logsumexp_v z_{t-1}[v]

where z_{t-1} are the logits the model outputs at position t-1. Prompt and padding tokens are context
but are never predicted: their targets are set to `ignore_index` (-100, the PyTorch / Hugging Face
convention) and contribute nothing to the loss or its gradient.

The loss is returned as a *sum* with the number of predicted tokens, because the training loop
(`minillm.train`) divides the gradient by the token count of the whole effective batch: then one batch
of 8 and four micro-batches of 2 give the same update.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from minillm.tokenizer import ROLE_TOKENS

IGNORE_INDEX = -100

def shift_for_next_token(ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a token sequence into model inputs and next-token targets.

        inputs[b, t]  = ids[b, t]                                   t = 0 .. T-2
        targets[b, t] = ids[b, t+1]  if loss_mask[b, t+1] == 1 else -100

    `loss_mask` (aligned with `ids`) marks the tokens to be *predicted* (the response), so the mask is
    shifted together with the targets: position t of the model predicts token t+1, and it is scored
    only if token t+1 is a response token. loss_mask[:, 0] is never used (no prefix predicts token 0).

    ids: (B, T) integer token ids; loss_mask: (B, T) of 0/1 (or bool). Returns two (B, T-1) tensors.
    """
    _check_ids_and_mask(ids, loss_mask)
    inputs = ids[:, :-1]  # (B, T-1)
    targets = ids[:, 1:].masked_fill(loss_mask[:, 1:] == 0, IGNORE_INDEX)  # (B, T-1)
    return inputs, targets


def masked_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood over the targets that are not `ignore_index`.

        loss_sum = sum_{i : y_i != ignore} ( logsumexp_v z_i[v] - z_i[y_i] ),   n_tokens = |{i : y_i != ignore}|

    logits: (..., V) floating; targets: (...) integer, `targets[b, t]` is the token position t must
    predict (use `shift_for_next_token`). Returns (loss_sum, n_tokens) as 0-dim tensors on the logits'
    device; loss_sum / n_tokens equals F.cross_entropy(logits, targets, ignore_index=ignore_index).
    When every target is ignored the loss is 0 with a zero gradient (F.cross_entropy gives NaN).
    fp16/bf16 logits are upcast to fp32 first, as F.cross_entropy does under autocast.
    """
    _check_logits_and_targets(logits, targets, ignore_index)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    V = logits.shape[-1]
    z = logits.reshape(-1, V)  # (N, V) with N = B * T
    y = targets.reshape(-1)  # (N,)
    keep = y != ignore_index  # (N,)
    # gather needs a valid index everywhere; ignored rows read class 0 and are then zeroed by `where`
    y_safe = y.masked_fill(~keep, 0)
    log_z = torch.logsumexp(z, dim=-1)  # (N,) stable for large logits: max is subtracted inside
    z_y = z.gather(-1, y_safe[:, None]).squeeze(-1)  # (N,)
    nll = torch.where(keep, log_z - z_y, torch.zeros_like(log_z))  # `where`: ignored rows get gradient 0
    return nll.sum(), keep.sum()


def masked_cross_entropy_mean(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Mean next-token NLL over non-ignored targets: loss_sum / max(n_tokens, 1) (0 if all are ignored)."""
    loss_sum, n_tokens = masked_cross_entropy(logits, targets, ignore_index)
    return loss_sum / n_tokens.clamp(min=1)


def _check_ids_and_mask(ids: torch.Tensor, loss_mask: torch.Tensor) -> None:
    if not isinstance(ids, torch.Tensor) or not isinstance(loss_mask, torch.Tensor):
        raise TypeError("shift_for_next_token: ids and loss_mask must be torch.Tensor")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"shift_for_next_token: ids must be an integer tensor, got {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"shift_for_next_token: ids must be (B, T), got shape {tuple(ids.shape)}")
    if loss_mask.shape != ids.shape:
        raise ValueError(
            f"shift_for_next_token: loss_mask shape {tuple(loss_mask.shape)} != ids shape {tuple(ids.shape)}"
        )
    if ids.shape[1] < 2:
        raise ValueError(f"shift_for_next_token: need at least 2 tokens per row to predict one, got T={ids.shape[1]}")


def _check_logits_and_targets(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> None:
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("masked_cross_entropy: logits and targets must be torch.Tensor")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"masked_cross_entropy: logits must be floating point, got {logits.dtype}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
        raise TypeError(f"masked_cross_entropy: targets must be an integer tensor, got {targets.dtype}")
    if logits.dim() < 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"masked_cross_entropy: logits (..., V) must match targets (...): "
            f"got logits {tuple(logits.shape)} and targets {tuple(targets.shape)}"
        )
    V = logits.shape[-1]
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(
            f"masked_cross_entropy: targets must be in [0, {V}) or ignore_index={ignore_index}, found {value}"
        )


# ------------------------------------------------------------------------------------------------
# Data: chats -> (ids, loss_mask) through the chat template -> padded batches
# ------------------------------------------------------------------------------------------------
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
    from minillm.datasets import read_jsonl

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


def sft_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed masked cross-entropy over the response tokens, and their count (see `minillm.train`)."""
    logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
    return masked_cross_entropy(logits, batch["targets"])


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
