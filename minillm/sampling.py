"""Decoding: greedy, temperature, top-k and top-p (nucleus) sampling, and beam search, with or without a KV cache.

At each step the model gives logits z over the vocabulary for the next token, and

    p_i = softmax(z / T)_i                      temperature T (T -> 0 is greedy argmax)
    top-k: keep the k largest p_i, renormalise
    top-p: keep the smallest set of most likely tokens whose total probability reaches p (Holtzman et al., 2020)

Without a cache every step re-runs the whole sequence: O(T^2) work for T tokens. With the KV cache the
keys and values of earlier tokens are kept, and each step runs only the newest token against them.

Beam search keeps the W most likely partial continuations instead of one, and ranks finished ones by

    score(y) = sum_t log p(y_t | x, y_<t) / |y| ** length_penalty        |y| = new tokens, eos included
"""
from __future__ import annotations

from collections.abc import Iterator

import math

import torch
import torch.nn.functional as F

from minillm.model import GPT, KV


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest in its row to -inf. logits: (B, V)."""
    if k <= 0:
        raise ValueError(f"top_k must be positive, got {k}")
    # BEGIN ASSIGNMENT sampling-top-k
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))
    # END ASSIGNMENT


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their probability mass reaches p. logits: (B, V)."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    # BEGIN ASSIGNMENT sampling-top-p
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
    remove_sorted = mass_before >= p  # the top token has mass_before 0, so it is always kept
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))
    # END ASSIGNMENT


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One next token per row from logits (B, V): greedy when temperature == 0, else sampled."""
    if not temperature >= 0:  # also refuses NaN, which would turn every probability into NaN
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None:
        logits = filter_top_p(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def kv_cache_step(model: GPT, token: torch.Tensor, past: list[KV] | None) -> tuple[torch.Tensor, list[KV]]:
    """One decode step written out by hand: the newest token (B,) against each layer's cached keys and values.

    With t = T_past (the number of cached positions) and h = wte[token] + wpe[t], for every layer l:

        q, k, v = split(c_attn(LN_1 h))          one new row each, (B, H, 1, D) after the head split
        K_l <- [K_l ; k],  V_l <- [V_l ; v]      append along time; earlier rows are never recomputed
        h <- h + c_proj(softmax(q K_l^T / sqrt(D)) V_l)
        h <- h + MLP(LN_2 h)

    and the logits are lm_head(LN_f h). No mask: the newest token may attend to every cached one. `generate`
    does the same through `GPT.forward(..., past_key_values=past)`; this function is the step spelled out.
    Returns the next-token logits (B, vocab_size) and the cache including this token.
    """
    t_past = 0 if past is None else past[0][0].shape[2]
    if t_past >= model.config.block_size:
        raise ValueError(f"kv_cache_step: the cache already holds block_size={model.config.block_size} positions")
    # BEGIN ASSIGNMENT kv-cache-step
    h = model.wte(token[:, None]) + model.wpe.weight[t_past]  # (B, 1, C)
    presents: list[KV] = []
    for i, block in enumerate(model.h):
        attn = block.attn
        B = h.shape[0]
        inner = attn.n_head * attn.head_dim
        q, k, v = attn.c_attn(block.ln_1(h)).split(inner, dim=2)
        # (B, 1, H * D) -> (B, H, 1, D)
        q, k, v = (z.view(B, 1, attn.n_head, attn.head_dim).transpose(1, 2) for z in (q, k, v))
        if past is not None:
            k = torch.cat([past[i][0], k], dim=2)  # (B, H, t_past + 1, D)
            v = torch.cat([past[i][1], v], dim=2)
        weights = torch.softmax(q @ k.transpose(-2, -1) / attn.head_dim ** 0.5, dim=-1)  # (B, H, 1, t_past + 1)
        y = (weights @ v).transpose(1, 2).reshape(B, 1, inner)  # (B, H, 1, D) -> (B, 1, H * D)
        h = h + attn.c_proj(y)
        h = h + block.mlp(block.ln_2(h))
        presents.append((k, v))
    return model.lm_head(model.ln_f(h))[:, -1, :], presents
    # END ASSIGNMENT


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to one (B, T) tensor; returns (ids, attention_mask) with 1 on real tokens."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = 1
    return ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: the first real token of each row gets position 0."""
    return (mask.cumsum(dim=-1) - 1).clamp(min=0)


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor | list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    pad_id: int = 0,
) -> torch.Tensor:
    """Extend each prompt by up to max_new_tokens tokens; returns ids (B, T_prompt + n_generated).

    idx is a (B, T) tensor (optionally left-padded, with attention_mask) or a list of token lists of
    different lengths, which are left-padded here. A row that emits eos_id is finished: its later
    positions hold eos_id, and generation stops when every row is finished. Prompts longer than the
    context are cropped from the left. With use_cache the result is the same as without, only faster.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    device = next(model.parameters()).device
    if isinstance(idx, list):
        idx, attention_mask = left_pad(idx, pad_id)
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"generate: idx must be (B, T) with T >= 1 prompt tokens, got shape {tuple(idx.shape)}")
    idx = idx.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(idx)
    attention_mask = attention_mask.to(device)
    block = model.config.block_size
    # Without padding the model's default positions and causal mask are exactly right: skip building them.
    padded = not bool(attention_mask.all())
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=device)
    past: list[KV] | None = None
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            if past is None or past[0][0].shape[2] + 1 > block:
                # No cache yet, no cache wanted, or the window slid past block_size: run the cropped window.
                window_ids, window_mask = idx[:, -block:], attention_mask[:, -block:]
                logits, past = model(
                    window_ids, attention_mask=window_mask if padded else None,
                    position_ids=positions_from_mask(window_mask) if padded else None, use_cache=True,
                )
            else:
                # Only the newest token runs; it attends to the cached keys/values.
                window_mask = attention_mask[:, -past[0][0].shape[2] - 1:]  # the cached tokens + this one
                logits, past = model(
                    idx[:, -1:], attention_mask=window_mask if padded else None, past_key_values=past,
                    position_ids=positions_from_mask(window_mask)[:, -1:] if padded else None, use_cache=True,
                )
            if not use_cache:
                past = None
            next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            if eos_id is not None:
                next_id = torch.where(finished, torch.full_like(next_id, eos_id), next_id)
                finished |= next_id == eos_id
            idx = torch.cat([idx, next_id[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_id)[:, None]], dim=1)
            if eos_id is not None and bool(finished.all()):
                break
    finally:
        model.train(was_training)
    return idx


@torch.no_grad()
def stream_tokens(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """The tokens `generate` appends to one prompt, yielded one at a time as they are decoded (a chat window shows
    them at once). Stops at eos_id, which is not yielded. The prompt must leave room: len(prompt) + max_new_tokens
    <= block_size (a chat trims its history to fit)."""
    if not prompt:
        raise ValueError("stream_tokens: the prompt is empty")
    if len(prompt) + max_new_tokens > model.config.block_size:
        raise ValueError(f"stream_tokens: {len(prompt)} prompt tokens + {max_new_tokens} new ones exceed the context "
                         f"of {model.config.block_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        logits, past = model(torch.tensor([prompt], device=device), use_cache=True)
        for _ in range(max_new_tokens):
            next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            token = int(next_id)
            if token == eos_id:
                return
            yield token
            logits, past = model(next_id[:, None], past_key_values=past, use_cache=True)
    finally:
        model.train(was_training)


def generate_completions(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int | None = None,
    batch_size: int = 64,
    **sampling,
) -> list[list[int]]:
    """The new tokens of each prompt (eos and what follows it removed), batching the prompts."""
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids = generate(model, chunk, max_new_tokens, eos_id=eos_id, **sampling)
        T = max(len(p) for p in chunk)
        for row in ids[:, T:].tolist():
            if eos_id is not None and eos_id in row:
                row = row[: row.index(eos_id)]
            out.append(row)
    return out


def _check_beam_args(model: GPT, T: int, beam_width: int, max_new_tokens: int) -> None:
    V, block = model.config.vocab_size, model.config.block_size
    if isinstance(beam_width, bool) or not isinstance(beam_width, int) or not 1 <= beam_width <= V:
        raise ValueError(f"beam_width must be an int in 1..vocab_size={V}, got {beam_width!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if T < 1 or T + max_new_tokens > block:
        raise ValueError(f"beam_search: a prompt of {T} tokens plus max_new_tokens={max_new_tokens} does not fit the "
                         f"context of block_size={block} tokens (shorten the prompt or lower max_new_tokens)")


def _best_possible(alive: torch.Tensor, length: int, max_new_tokens: int, length_penalty: float) -> torch.Tensor:
    """An upper bound on the final score of each alive beam (summed log-probs `alive`, `length` tokens so far).

    Log-probabilities are <= 0, so the sum can only fall; with length_penalty > 0 the division by the longest
    possible length is the most favourable, otherwise the division by the shortest (one more token).
    """
    best_length = max_new_tokens if length_penalty > 0 else length + 1
    return alive / best_length ** length_penalty


@torch.no_grad()
def beam_search(
    model: GPT,
    idx: torch.Tensor,
    beam_width: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    eos_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The highest-scoring continuation of each row found with W = beam_width beams, on the KV cache.

    Per row and step: every alive beam y (summed log-prob s_y) is extended by every token v,
    s_{y+v} = s_y + log p(v | x, y); the 2W best extensions are ranked, an extension by eos_id among the W
    best finishes with score s / |y+v| ** length_penalty, and the W best other extensions stay alive (their
    keys and values are reordered in the cache, not recomputed). Beams still alive after max_new_tokens
    finish too. A row stops when W beams have finished and no alive beam can still beat them.

    idx: (B, T) prompts of equal length, no padding. Returns tokens (B, T + n), the prompt followed by the best
    finished continuation (rows that finished early are filled with eos_id), and its score (B,).
    With beam_width=1 and no eos this is greedy decoding; length_penalty 0 ranks by summed log-probability.
    """
    if idx.dim() != 2:
        raise ValueError(f"beam_search: idx must be (B, T) token ids, got shape {tuple(idx.shape)}")
    B, T = idx.shape
    _check_beam_args(model, T, beam_width, max_new_tokens)
    W, V = beam_width, model.config.vocab_size
    # BEGIN ASSIGNMENT beam-search
    was_training = model.training
    model.eval()
    try:
        idx = idx.to(next(model.parameters()).device)
        logits, past = model(idx, use_cache=True)  # the prompt runs once per row, not once per beam
        past = [(k.repeat_interleave(W, 0), v.repeat_interleave(W, 0)) for k, v in past]  # (B * W, H, T, D)
        logp = F.log_softmax(logits[:, -1].float(), dim=-1).repeat_interleave(W, 0)  # (B * W, V)
        # float64 sums: the stopping test compares them with finished scores kept as Python floats
        alive = torch.full((B, W), -math.inf, dtype=torch.float64, device=idx.device)
        alive[:, 0] = 0.0  # W identical copies of the prompt: only the first may extend, or the beams would repeat
        seqs = idx.repeat_interleave(W, 0)  # (B * W, T + length)
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
        for step in range(max_new_tokens):
            length = step + 1
            candidates = (alive.view(-1, 1) + logp.double()).view(B, W * V)  # (B, W * V): beam-major
            top_scores, top_flat = candidates.topk(min(2 * W, W * V), dim=1)  # (B, 2W)
            keep_src = torch.zeros(B, W, dtype=torch.long, device=idx.device)
            keep_tok = torch.zeros(B, W, dtype=torch.long, device=idx.device)
            new_alive = torch.full((B, W), -math.inf, dtype=torch.float64, device=idx.device)
            for b in range(B):
                kept = 0
                for score, flat in zip(top_scores[b].tolist(), top_flat[b].tolist()):
                    if score == -math.inf or kept == W:  # an eos ranked below the W kept beams is never looked at
                        break
                    src, tok = divmod(flat, V)
                    if eos_id is not None and tok == eos_id:
                        _add_finished(finished[b], score / length ** length_penalty,
                                      seqs[b * W + src, T:].tolist() + [tok], W)
                        continue
                    keep_src[b, kept], keep_tok[b, kept], new_alive[b, kept] = src, tok, score
                    kept += 1
            rows = (torch.arange(B, device=idx.device)[:, None] * W + keep_src).view(-1)  # source beam of each
            seqs = torch.cat([seqs[rows], keep_tok.view(-1, 1)], dim=1)
            past = [(k[rows], v[rows]) for k, v in past]  # reorder the cache to follow its beams
            alive = new_alive
            bound = _best_possible(alive, length, max_new_tokens, length_penalty).max(dim=1).values
            done = [len(f) == W and bound[b].item() <= f[-1][0] for b, f in enumerate(finished)]
            if all(done):  # no alive beam can beat the finished ones: they are not candidates any more
                break
            if length == max_new_tokens:
                for b in range(B):  # beams alive at the end finish as they are
                    for w in range(W):
                        if alive[b, w] > -math.inf:
                            _add_finished(finished[b], alive[b, w].item() / length ** length_penalty,
                                          seqs[b * W + w, T:].tolist(), W)
                break
            logits, past = model(keep_tok.view(-1, 1), past_key_values=past, use_cache=True)
            logp = F.log_softmax(logits[:, -1].float(), dim=-1)
    finally:
        model.train(was_training)
    best = [f[0] for f in finished]
    n = max(len(toks) for _, toks in best)
    fill = eos_id if eos_id is not None else 0
    out = torch.full((B, T + n), fill, dtype=torch.long, device=idx.device)
    out[:, :T] = idx
    for b, (_, toks) in enumerate(best):
        out[b, T:T + len(toks)] = torch.tensor(toks, dtype=torch.long)
    return out, torch.tensor([score for score, _ in best], device=idx.device)
    # END ASSIGNMENT


def _add_finished(hyps: list[tuple[float, list[int]]], score: float, tokens: list[int], keep: int) -> None:
    """Insert a finished hypothesis, keeping the `keep` best sorted by score (ties: the earlier one first)."""
    hyps.append((score, tokens))
    hyps.sort(key=lambda h: -h[0])
    del hyps[keep:]


def beam_search_completions(
    model: GPT,
    prompts: list[list[int]],
    beam_width: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    eos_id: int | None = None,
) -> tuple[list[list[int]], list[float]]:
    """`beam_search` over prompts of any lengths (equal lengths run as one batch); the new tokens of each
    prompt without eos and what follows it, and the scores."""
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    out: list[list[int]] = [[] for _ in prompts]
    scores = [0.0] * len(prompts)
    device = next(model.parameters()).device
    for T, rows in by_length.items():
        ids = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=device)
        tokens, s = beam_search(model, ids, beam_width, max_new_tokens, length_penalty, eos_id)
        for i, row, score in zip(rows, tokens[:, T:].tolist(), s.tolist()):
            out[i] = row[: row.index(eos_id)] if eos_id is not None and eos_id in row else row
            scores[i] = score
    return out, scores
