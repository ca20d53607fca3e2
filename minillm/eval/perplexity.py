"""Perplexity of a causal language model, with the two ways of fitting long text into a short window.

    PPL(x) = exp( -(1/N) sum_{i in S} log p_theta(x_i | x_<i) ),   N = |S| tokens scored

(Jelinek et al., 1977). A model sees at most L = block_size tokens, so a long text is scored in windows:

1. Strided sliding windows (the Hugging Face perplexity guide, transformers `docs/source/en/perplexity.md`):
   a window of L tokens starts every `stride` tokens, [begin, end) with end = min(begin + L, n), and scores
   only the tokens the previous window did not, i.e. positions prev_end .. end-1. The first token of a
   window has no context inside it and is never scored. stride = L gives disjoint chunks, each losing
   its first token and giving the next ones little context; stride < L re-reads the overlap as context,
   so every token after the first gets at least L - stride tokens of it (the guide: stride 512 of 1024).
   The guide weights each window's mean loss by (labels - 1), which is off by one token for overlapping
   windows; here log-likelihoods are summed exactly, so `n_tokens` is exactly the number scored.
2. Rolling windows (lm-evaluation-harness `loglikelihood_rolling`, `utils.get_rolling_token_windows` +
   `make_disjoint_window`, context_len = 1): a prefix token (BOS/EOS) conditions the first token, so every
   token of the document is scored exactly once; windows do not overlap in what they predict.

From the same summed log-likelihoods lm-eval reports, weighted over all documents,

    word_perplexity = exp(-sum ll / sum words)       words = len(re.split(r"\\s+", text))
    byte_perplexity = exp(-sum ll / sum bytes)       bytes = len(text.encode("utf-8"))
    bits_per_byte   = -sum ll / sum bytes / ln 2

which, unlike token perplexity, compare models with different tokenizers.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn as nn

from minillm.eval.loglik import model_max_length, score_continuations


def _as_token_list(token_ids: Sequence[int] | torch.Tensor, name: str) -> list[int]:
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1:
            raise ValueError(f"{name} must be a 1-D sequence of token ids, got shape {tuple(token_ids.shape)}")
        return [int(t) for t in token_ids.tolist()]
    if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Sequence):
        raise TypeError(f"{name} must be a list or 1-D tensor of token ids, got {type(token_ids).__name__}")
    return [int(t) for t in token_ids]


def strided_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """The HF guide's windows as (begin, first_scored, end): input x[begin:end], targets x[first_scored:end].

    for begin in 0, stride, 2*stride, ...: end = min(begin + L, n); score positions max(prev_end, begin + 1)
    .. end - 1 (a window's first token has no context); stop once end == n.
    """
    if n_tokens < 2:
        raise ValueError(f"token_ids: need at least 2 tokens to score one, got {n_tokens}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2 (one context + one target), got {max_length!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= max_length:
        raise ValueError(f"stride must be an integer in [1, max_length={max_length}], got {stride!r}")
    # BEGIN ASSIGNMENT perplexity-windows
    windows = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        windows.append((begin, max(prev_end, begin + 1), end))
        prev_end = end
        if end == n_tokens:
            break
    return windows
    # END ASSIGNMENT


def perplexity(
    model: nn.Module,
    token_ids: Sequence[int] | torch.Tensor,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
) -> dict[str, float | int]:
    """exp of the mean NLL over the tokens scored by the strided sliding windows (`strided_windows`).

    PPL = exp(-(1/N) sum_i log p(x_i | x_[begin(i):i])) where begin(i) is the start of the first window
    that reaches x_i. max_length defaults to the model's block_size and stride to max_length // 2
    (the guide's 512 of 1024). Returns {nll, ppl, n_tokens, n_windows}.
    """
    ids = _as_token_list(token_ids, "token_ids")
    L = model_max_length(model, max_length)
    stride = max(1, L // 2) if stride is None else stride
    windows = strided_windows(len(ids), L, stride)
    # Window [begin, end) scoring [first, end) is the request (context x[begin:first], continuation x[first:end]).
    requests = [(ids[begin:first], ids[first:end]) for begin, first, end in windows]
    scores = score_continuations(model, requests, batch_size=batch_size, max_length=L)
    total_logprob = sum(ll for ll, _ in scores)
    n_tokens = sum(end - first for _, first, end in windows)
    nll = -total_logprob / n_tokens
    return {"nll": nll, "ppl": math.exp(nll), "n_tokens": n_tokens, "n_windows": len(windows)}


def rolling_windows(
    tokens: Sequence[int] | int, prefix_token: int, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """(context, predicted) windows of lm-eval's get_rolling_token_windows(context_len=1) + make_disjoint_window.

    tokens: the document's ids, or an int n to lay out the positions 0..n-1. The first window predicts
    t[:L] from [prefix] (the model reads [prefix] + t[:L-1]); each later one predicts the next
    min(L, remaining) tokens from the tokens just before them, trimmed so context + predicted = L + 1
    tokens (one context token for a full window, L - n_pred + 1 for the last short one). The model input
    is (context + predicted)[:-1], at most L tokens. Example, L = 4, 10 tokens:
    ([p] -> 0..3), ([3] -> 4..7), ([5, 6, 7] -> 8, 9).
    """
    if isinstance(tokens, bool):
        raise TypeError("tokens must be a sequence of token ids or an int")
    toks = list(range(tokens)) if isinstance(tokens, int) else _as_token_list(tokens, "tokens")
    if not toks:
        raise ValueError("tokens: a document needs at least 1 token to score")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    L = max_length
    first = min(L, len(toks))
    windows = [([prefix_token], toks[:first])]
    predicted = first
    while predicted < len(toks):
        n_pred = min(len(toks) - predicted, L)  # pred_len = L - context_len + 1 = L
        end = predicted + n_pred
        context = toks[end - L - 1:end - 1][: L - n_pred + 1]  # made disjoint: drop what is predicted
        windows.append((context, toks[predicted:end]))
        predicted = end
    return windows


def rolling_loglikelihood(
    model: nn.Module,
    ids: Sequence[int] | torch.Tensor,
    prefix_token: int,
    max_length: int | None = None,
    batch_size: int = 8,
) -> float:
    """sum_{i=0}^{n-1} log p(x_i | prefix, x_<i) over the rolling windows: every token scored exactly once.

    lm-eval's `loglikelihood_rolling` for one document; prefix_token is BOS or, as for GPT-2, EOS.
    """
    L = model_max_length(model, max_length)
    windows = rolling_windows(_as_token_list(ids, "ids"), prefix_token, L)
    return sum(ll for ll, _ in score_continuations(model, windows, batch_size=batch_size, max_length=L))


def count_words(text: str) -> int:
    """lm-eval's word count: len(re.split(r"\\s+", text)) (so a trailing newline adds an empty word)."""
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    """UTF-8 length of the text."""
    return len(text.encode("utf-8"))


def _weighted_mean(logliks: Sequence[float], counts: Sequence[int]) -> float:
    if len(logliks) != len(counts):
        raise ValueError(f"logliks ({len(logliks)}) and counts ({len(counts)}) must have the same length")
    total = sum(counts)
    if total <= 0:
        raise ValueError(f"counts must sum to a positive number, got {total}")
    return sum(logliks) / total


def word_perplexity(logliks: Sequence[float], n_words: Sequence[int]) -> float:
    """exp(-sum ll / sum words), weighted over documents (lm-eval `weighted_perplexity`)."""
    return math.exp(-_weighted_mean(logliks, n_words))


def byte_perplexity(logliks: Sequence[float], n_bytes: Sequence[int]) -> float:
    """exp(-sum ll / sum bytes)."""
    return math.exp(-_weighted_mean(logliks, n_bytes))


def bits_per_byte(logliks: Sequence[float], n_bytes: Sequence[int]) -> float:
    """-sum ll / sum bytes / ln 2: the code length per byte, in bits."""
    return -_weighted_mean(logliks, n_bytes) / math.log(2)


def document_perplexity(
    model: nn.Module,
    tokenizer,
    docs: Sequence[str],
    max_length: int | None = None,
    batch_size: int = 8,
) -> dict[str, float | int]:
    """lm-eval's wikitext-style metrics: rolling log-likelihood per document, then weighted aggregates.

    Each document is scored from the `eot_id` prefix. Returns token/word/byte perplexity, bits_per_byte
    and the totals they were computed from (words and bytes counted on the documents as given).
    """
    if isinstance(docs, str) or not docs:
        raise ValueError("docs must be a non-empty list of strings")
    logliks, n_tok, n_words, n_bytes = [], [], [], []
    for i, doc in enumerate(docs):
        if not isinstance(doc, str) or not doc:
            raise ValueError(f"docs[{i}] must be a non-empty string")
        ids = list(tokenizer.encode(doc))
        logliks.append(rolling_loglikelihood(model, ids, tokenizer.eot_id, max_length, batch_size))
        n_tok.append(len(ids))
        n_words.append(count_words(doc))
        n_bytes.append(count_bytes(doc))
    return {
        "token_perplexity": math.exp(-_weighted_mean(logliks, n_tok)),
        "word_perplexity": word_perplexity(logliks, n_words),
        "byte_perplexity": byte_perplexity(logliks, n_bytes),
        "bits_per_byte": bits_per_byte(logliks, n_bytes),
        "loglikelihood": sum(logliks),
        "n_docs": len(docs),
        "n_tokens": sum(n_tok),
        "n_words": sum(n_words),
        "n_bytes": sum(n_bytes),
    }
