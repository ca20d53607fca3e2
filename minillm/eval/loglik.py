"""The log-likelihood primitive under every multiple-choice and perplexity evaluation.

For a context x and a continuation y = (y_1, ..., y_m), both token sequences,

    ll(y | x)  = sum_{t=1}^{m} log p_theta(y_t | x, y_<t)
    is_greedy  = [ y_t == argmax_v p_theta(v | x, y_<t)  for every t ]

exactly as EleutherAI's lm-evaluation-harness (Gao et al., 2021-) computes its `loglikelihood` requests
for causal models (`HFLM._encode_pair` and `_loglikelihood_tokens`):

- Context and continuation are tokenised *jointly*: trailing whitespace of the context moves to the
  front of the continuation, then  whole = encode(ctx + cont),  ctx_enc = encode(ctx),
  cont_enc = whole[len(ctx_enc):].  A BPE tokenizer merges " Paris" into one token, so encoding the
  continuation on its own would score different tokens than the model sees in running text.
- An empty context is replaced by the prefix token (<|endoftext|>) so y_1 has something to condition on.
- The model input is  (ctx_enc + cont_enc)[-(L + 1):][:-1]  for a window of L tokens: a context too long
  for the window is cropped from the left, and the last token is never fed in (nothing follows it).
  The continuation's log-probabilities are read at the last m positions of that input.
- Requests are sorted longest first and batched with right padding; causal attention means the padding
  after a sequence cannot change its logits, so no attention mask is needed.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """eval() mode (no dropout) and no autograd inside the block; the model's previous mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model that has neither)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def model_max_length(model: nn.Module, max_length: int | None) -> int:
    """The scoring window L: `max_length`, else the model's context `config.block_size`; checked against it."""
    block_size = getattr(getattr(model, "config", None), "block_size", None)
    if max_length is None:
        if block_size is None:
            raise ValueError("max_length: the model has no config.block_size, so pass max_length explicitly")
        return int(block_size)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    if block_size is not None and max_length > block_size:
        raise ValueError(f"max_length ({max_length}) exceeds the model's block_size ({block_size})")
    return max_length


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context_enc, continuation_enc) tokenised jointly, lm-eval's `_encode_pair`.

    The trailing whitespace of the context moves into the continuation ("Answer: " + "A" becomes
    "Answer:" + " A"); then whole = encode(ctx + cont) and cont_enc = whole[len(encode(ctx)):].
    """
    if not isinstance(context, str) or not isinstance(continuation, str):
        raise TypeError(
            f"a request is (context: str, continuation: str), got ({type(context).__name__}, "
            f"{type(continuation).__name__})"
        )
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole_enc = list(tokenizer.encode(context + continuation))
    context_enc = list(tokenizer.encode(context))
    return context_enc, whole_enc[len(context_enc):]


def _model_input(
    context_enc: Sequence[int], continuation_enc: Sequence[int], max_length: int, where: str
) -> list[int]:
    """(context + continuation)[-(L + 1):][:-1]: the left-cropped window whose last m logits predict y."""
    if len(continuation_enc) == 0:
        raise ValueError(f"{where}: the continuation encodes to no tokens, so there is nothing to score")
    if len(context_enc) == 0:
        raise ValueError(f"{where}: empty context; the first continuation token needs at least one token before it")
    if len(continuation_enc) > max_length:
        raise ValueError(
            f"{where}: continuation of {len(continuation_enc)} tokens does not fit the window of {max_length}"
        )
    return (list(context_enc) + list(continuation_enc))[-(max_length + 1):][:-1]


def _check_token_range(model: nn.Module, *token_lists: Sequence[Sequence[int]]) -> None:
    """A token id outside [0, vocab_size) would fail deep inside an embedding or gather; say so here."""
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    ids = [t for lists in token_lists for seq in lists for t in seq]
    if vocab_size is not None and ids and not 0 <= min(ids) <= max(ids) < vocab_size:
        bad = next(t for t in ids if not 0 <= t < vocab_size)
        raise ValueError(f"token id {bad} is outside the model's vocabulary [0, {vocab_size})")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) = logit[target] - logsumexp(logits), and whether target is the argmax.

    logits: (..., V), targets: (...). The softmax runs in at least float32 (bf16 logits lose digits), and
    only the gathered entries are kept, so no (B, T, V) log-probability tensor is materialised.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (...)
    return picked - logits.logsumexp(dim=-1), logits.argmax(dim=-1) == targets


def score_continuations(
    model: nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 32,
    max_length: int | None = None,
) -> list[tuple[float, bool]]:
    """(ll, is_greedy) for each already-tokenised (context_enc, continuation_enc) request.

    ll = sum_t log p(y_t | x, y_<t) over the continuation tokens, with the context cropped from the left
    to fit a window of L = max_length (default: the model's block_size) tokens. lm-eval's
    `_loglikelihood_tokens`, batched longest first; results come back in the order of `requests`.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    L = model_max_length(model, max_length)
    inputs = [_model_input(ctx, cont, L, f"requests[{i}]") for i, (ctx, cont) in enumerate(requests)]
    conts = [list(cont) for _, cont in requests]
    _check_token_range(model, inputs, conts)
    # Longest first: similar lengths share a batch (less padding), and the first batch shows at once
    # whether the largest one fits in memory.
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
    device = model_device(model)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(inputs)
    with evaluating(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            T = len(inputs[chunk[0]])
            # Built on the CPU, then moved in one copy each.
            x = torch.zeros(len(chunk), T, dtype=torch.long)  # (B, T), right-padded
            y = torch.zeros(len(chunk), T, dtype=torch.long)  # targets at the scored positions
            scored = torch.zeros(len(chunk), T, dtype=torch.bool)
            for row, i in enumerate(chunk):
                n_in, m = len(inputs[i]), len(conts[i])
                x[row, :n_in] = torch.tensor(inputs[i])
                y[row, n_in - m:n_in] = torch.tensor(conts[i])
                scored[row, n_in - m:n_in] = True
            x, y, scored = x.to(device), y.to(device), scored.to(device)
            logp, greedy = token_logprobs(model(x), y)  # (B, T), (B, T)
            sums = torch.where(scored, logp, torch.zeros_like(logp)).sum(dim=1)  # (B,)
            all_greedy = (greedy | ~scored).all(dim=1)  # (B,)
            for row, i in enumerate(chunk):
                results[i] = (float(sums[row]), bool(all_greedy[row]))
    return results


def loglikelihood(
    model: nn.Module,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 32,
    max_length: int | None = None,
) -> list[tuple[float, bool]]:
    """(sum_logprob, is_greedy) of each continuation given its context: lm-eval's `loglikelihood`.

    ll(cont | ctx) = sum_t log p(cont_t | ctx, cont_<t), with context and continuation tokenised jointly
    (`encode_pair`), an empty context replaced by the tokenizer's `eot_id`, and a context longer than
    the window (max_length, default block_size) cropped from the left.
    """
    token_requests = []
    for i, request in enumerate(requests):
        if not isinstance(request, (tuple, list)) or len(request) != 2:
            raise TypeError(f"requests[{i}] must be a (context, continuation) pair, got {request!r}")
        context, continuation = request
        if context == "":
            context_enc, continuation_enc = [tokenizer.eot_id], list(tokenizer.encode(continuation))
        else:
            context_enc, continuation_enc = encode_pair(tokenizer, context, continuation)
            if not context_enc:  # a whitespace-only context moved entirely into the continuation
                context_enc = [tokenizer.eot_id]
        token_requests.append((context_enc, continuation_enc))
    return score_continuations(model, token_requests, batch_size=batch_size, max_length=max_length)
