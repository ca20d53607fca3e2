"""Trainable tokens: train the embedding rows of a few chosen tokens and freeze the rest of the table.

This is Hugging Face PEFT's `trainable_token_indices` (its TrainableTokens method): for the chosen ids
t_1 .. t_n the rows of the embedding table E (V, d) are replaced by trained vectors,

    E'[t_k] = delta_k   (k = 1 .. n),        E'[i] = E[i]   for every other token i

delta (n, d) starts as a copy of the chosen rows, so the model starts unchanged, and only n d numbers
train. GPT-2 ties its output layer to the embedding (logits = h E^T), so the same replaced table E' is
used by the LM head: one shared delta serves both.

Why a PEFT run needs it: a chat template adds tokens (<|user|>, <|assistant|>, <|end|>) that pretraining
never saw. Their input rows are still random and their output rows were only ever pushed down by the
softmax, so a method that freezes the embeddings must bend every hidden state to make <|end|> likely, and
in practice keeps generating past the answer. Training these few rows fixes it for a few hundred numbers.
The replacement is mergeable: E <- E' (rows overwritten in place), which also updates the tied head.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def check_token_indices(token_indices: Sequence[int], vocab_size: int) -> list[int]:
    """A list of distinct ids in [0, vocab_size), or a ValueError naming the bad one."""
    if isinstance(token_indices, (str, bytes)) or not isinstance(token_indices, Sequence) or not token_indices:
        raise ValueError(f"trainable_token_indices must be a non-empty list of token ids, got {token_indices!r}")
    ids = []
    for t in token_indices:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise ValueError(f"trainable_token_indices: {t!r} is not a token id in [0, {vocab_size})")
        if t in ids:
            raise ValueError(f"trainable_token_indices: token id {t} is listed twice")
        ids.append(t)
    return ids


def check_trainable_tokens(model: nn.Module, token_indices: Sequence[int]) -> list[int]:
    """Validate `token_indices` against a GPT's vocabulary before anything is changed."""
    wte = getattr(model, "wte", None)
    if not isinstance(wte, nn.Embedding):
        raise ValueError(f"trainable_token_indices: the model has no plain nn.Embedding `wte` "
                         f"(got {type(wte).__name__}); apply it to a minillm GPT")
    return check_token_indices(token_indices, wte.num_embeddings)


class TrainableTokens(nn.Module):
    """The shared trained rows: `delta` (n, d) for the ids in `token_indices` (n,)."""

    def __init__(self, weight: torch.Tensor, token_indices: Sequence[int]) -> None:
        super().__init__()
        ids = check_token_indices(token_indices, weight.shape[0])
        index = torch.tensor(ids, dtype=torch.long, device=weight.device)
        self.register_buffer("token_indices", index, persistent=False)  # the config holds the ids
        self.delta = nn.Parameter(weight.detach()[index].clone())  # (n, d): starts as the original rows

    @property
    def merged(self) -> bool:
        return getattr(self, "unmerged_rows", None) is not None

    def replaced(self, weight: torch.Tensor) -> torch.Tensor:
        """E' = E with rows token_indices replaced by delta, (V, d); out of place, so E stays frozen."""
        return weight.index_copy(0, self.token_indices, self.delta.to(weight.dtype))

    def merge(self, weight: torch.Tensor) -> None:
        """E[t_k] <- delta_k in place (idempotent); the original rows are kept for `unmerge`."""
        if self.merged:
            return
        with torch.no_grad():
            # a buffer, so it follows .to(device); non-persistent: only a merged model holds it
            self.register_buffer("unmerged_rows", weight[self.token_indices].clone(), persistent=False)
            weight.index_copy_(0, self.token_indices, self.delta.to(weight.dtype))

    def unmerge(self, weight: torch.Tensor) -> None:
        """Put the original rows back exactly; nothing to do when unmerged."""
        if not self.merged:
            return
        with torch.no_grad():
            weight.index_copy_(0, self.token_indices, self.unmerged_rows)
        del self.unmerged_rows

    def extra_repr(self) -> str:
        return f"tokens={self.token_indices.tolist()}, dim={self.delta.shape[1]}"


class TrainableTokensLayer(nn.Module):
    """A frozen nn.Embedding (x -> E'[x]) or tied nn.Linear head (h -> h E'^T + b) reading the replaced table."""

    def __init__(self, base: nn.Module, tokens: TrainableTokens) -> None:
        super().__init__()
        if not isinstance(base, (nn.Embedding, nn.Linear)):
            raise TypeError(f"TrainableTokensLayer: base must be nn.Embedding or nn.Linear, got {type(base).__name__}")
        if base.weight.shape[1] != tokens.delta.shape[1]:
            raise ValueError(f"TrainableTokensLayer: base rows have width {base.weight.shape[1]}, "
                             f"the trained tokens {tokens.delta.shape[1]}")
        self.base = base.requires_grad_(False)
        self.tokens = tokens  # one module shared by the embedding and the tied head
        self.disabled = False

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base table, so code that reads `model.wte.weight` (device, dtype, shape) still works."""
        return self.base.weight

    @property
    def merged(self) -> bool:
        return self.tokens.merged

    def merge(self) -> None:
        self.tokens.merge(self.base.weight.data)

    def unmerge(self) -> None:
        self.tokens.unmerge(self.base.weight.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding: ids (B, T) -> (B, T, d); head: (B, T, d) -> logits (B, T, V). Base alone when
        disabled or merged (a merged table already holds the trained rows)."""
        if self.disabled and self.merged:
            raise RuntimeError("TrainableTokensLayer: adapters are disabled but the tokens are merged; unmerge() first")
        if self.disabled or self.merged:
            return self.base(x)
        weight = self.tokens.replaced(self.base.weight)
        if isinstance(self.base, nn.Embedding):
            return F.embedding(x, weight, self.base.padding_idx)
        return F.linear(x, weight, self.base.bias)


def apply_trainable_tokens(model: nn.Module, token_indices: Sequence[int]) -> nn.Module:
    """Wrap a GPT's `wte` (and its tied `lm_head`) so that only the rows `token_indices` train. In place."""
    check_trainable_tokens(model, token_indices)
    wte = model.wte
    tokens = TrainableTokens(wte.weight, token_indices)
    model.wte = TrainableTokensLayer(wte, tokens)
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear) and head.weight is wte.weight:  # tied: the head reads the same rows
        model.lm_head = TrainableTokensLayer(head, tokens)
    return model


def chat_token_ids(tokenizer) -> list[int]:
    """Ids of the chat template's own tokens (<|system|>, <|user|>, <|assistant|>, <|end|>): the rows to train."""
    return [tokenizer.system_id, tokenizer.user_id, tokenizer.assistant_id, tokenizer.end_id]
