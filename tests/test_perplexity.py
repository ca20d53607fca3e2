"""Perplexity: strided sliding windows (HF guide), rolling windows (lm-eval), and the per-word/byte metrics."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.eval.perplexity import (
    bits_per_byte,
    byte_perplexity,
    count_bytes,
    count_words,
    document_perplexity,
    perplexity,
    rolling_loglikelihood,
    rolling_windows,
    strided_windows,
    word_perplexity,
)


class ZeroLM(nn.Module):
    """Logits all zero: the uniform distribution over V tokens, so PPL = V exactly."""

    def __init__(self, vocab_size: int, block_size: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, block_size=block_size)

    def forward(self, idx, attention_mask=None):
        return torch.zeros(*idx.shape, self.config.vocab_size)


class PositionLM(nn.Module):
    """logit[token 0] = position within the window, others 0: log p(0) reveals how much context a token had."""

    def __init__(self, vocab_size: int, block_size: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, block_size=block_size)

    def forward(self, idx, attention_mask=None):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.config.vocab_size, dtype=torch.float64)
        logits[:, :, 0] = torch.arange(T, dtype=torch.float64)
        return logits


def position_logprob(t: int, vocab_size: int) -> float:
    """log p(token 0) at input position t of PositionLM: t - log(e^t + V - 1)."""
    return t - math.log(math.exp(t) + vocab_size - 1)


class BigramLM(nn.Module):
    """logits[b, t] = table[idx[b, t]]: p(next | previous token) only, whatever the window."""

    def __init__(self, vocab_size: int, block_size: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(vocab_size, vocab_size, generator=g, dtype=torch.float64))
        self.config = SimpleNamespace(vocab_size=vocab_size, block_size=block_size)

    def forward(self, idx, attention_mask=None):
        return self.table[idx]


def expected_context(n: int, L: int, stride: int) -> dict[int, int]:
    """Independent statement of the HF scheme: token i is scored in the earliest window begin < i < begin + L."""
    out = {}
    for i in range(1, n):
        begins = [b for b in range(0, n, stride) if b < i < b + L]
        if begins:
            out[i] = i - min(begins)
    return out


def test_uniform_logits_give_vocab_size():
    for V in (7, 50):
        res = perplexity(ZeroLM(V, 16), [i % V for i in range(40)], max_length=16, stride=5)
        assert res["ppl"] == pytest.approx(V, rel=1e-6)
        assert res["nll"] == pytest.approx(math.log(V), rel=1e-6)
        assert res["n_tokens"] == 39


@pytest.mark.parametrize("n,L,stride", [(10, 4, 4), (10, 4, 2), (10, 4, 3), (17, 5, 1), (9, 9, 4), (6, 8, 3),
                                        (2, 2, 1), (2, 2, 2), (30, 7, 7), (31, 8, 5), (12, 4, 1)])
def test_every_token_scored_once_with_most_context(n, L, stride):
    want = expected_context(n, L, stride)
    seen = {}
    for begin, first, end in strided_windows(n, L, stride):
        assert end - begin <= L
        for i in range(first, end):
            assert i not in seen, f"token {i} scored twice"
            seen[i] = i - begin
    assert seen == want
    if stride < L:
        assert len(seen) == n - 1  # only token 0 lacks context
    # The model-level count and the context each token had, read back from PositionLM's log-probs.
    V = 5
    res = perplexity(PositionLM(V, L), [0] * n, max_length=L, stride=stride, batch_size=3)
    assert res["n_tokens"] == len(want)
    expected_sum = sum(position_logprob(ctx - 1, V) for ctx in want.values())
    assert -res["nll"] * res["n_tokens"] == pytest.approx(expected_sum, rel=1e-9)


def test_disjoint_chunks_lose_their_first_token():
    """stride == max_length: chunks [0,4), [4,8), [8,10) score 3 + 3 + 1 tokens; tokens 0, 4, 8 are never scored."""
    windows = strided_windows(10, 4, 4)
    assert windows == [(0, 1, 4), (4, 5, 8), (8, 9, 10)]
    assert perplexity(ZeroLM(3, 4), [i % 3 for i in range(10)], max_length=4, stride=4)["n_tokens"] == 7
    assert strided_windows(10, 4, 2) == [(0, 1, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10)]


def test_window_covering_text_equals_full_context(tiny_model, tiny_config):
    torch.manual_seed(3)
    ids = torch.randint(0, tiny_config.vocab_size, (20,))
    with torch.no_grad():
        logits = tiny_model(ids[None])[0]
    full_nll = F.cross_entropy(logits[:-1], ids[1:]).item()
    for L, stride in [(32, 16), (20, 1), (20, 20), (25, 7)]:
        res = perplexity(tiny_model, ids, max_length=L, stride=stride)
        assert res["nll"] == pytest.approx(full_nll, rel=1e-5)
        assert res["n_tokens"] == 19 and res["n_windows"] == 1


def test_strided_matches_per_window_reference(tiny_model, tiny_config):
    """Each window's log-probs computed directly; batched windows of unequal length give the same answer."""
    torch.manual_seed(4)
    ids = torch.randint(0, tiny_config.vocab_size, (45,))
    L, stride = 12, 5
    total, count = 0.0, 0
    with torch.no_grad():
        for begin, first, end in strided_windows(45, L, stride):
            logp = torch.log_softmax(tiny_model(ids[None, begin:end])[0], dim=-1)
            for i in range(first, end):
                total += logp[i - begin - 1, ids[i]].item()
                count += 1
    for batch_size in (1, 3, 16):
        res = perplexity(tiny_model, ids.tolist(), max_length=L, stride=stride, batch_size=batch_size)
        assert res["n_tokens"] == count
        assert res["nll"] == pytest.approx(-total / count, rel=1e-5)
    assert perplexity(tiny_model, ids, max_length=L)["n_windows"] == len(strided_windows(45, L, L // 2))


def test_model_mode_restored(tiny_model):
    tiny_model.train()
    perplexity(tiny_model, [1, 2, 3, 4])
    assert tiny_model.training
    tiny_model.eval()


@pytest.mark.parametrize("kwargs,match", [
    (dict(token_ids=[5]), "at least 2 tokens"),
    (dict(token_ids=[]), "at least 2 tokens"),
    (dict(token_ids=[1, 2, 3], stride=0), "stride"),
    (dict(token_ids=[1, 2, 3], stride=-2), "stride"),
    (dict(token_ids=[1, 2, 3], max_length=8, stride=9), "stride"),
    (dict(token_ids=[1, 2, 3], max_length=64), "block_size"),
    (dict(token_ids=[1, 2, 3], max_length=1), "max_length"),
    (dict(token_ids=torch.zeros(2, 3, dtype=torch.long)), "1-D"),
    (dict(token_ids=[1, 2, 97]), "vocabulary"),
])
def test_bad_input(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        perplexity(tiny_model, **kwargs)


def test_rolling_windows_lecture_example():
    p = 99
    assert rolling_windows(10, p, 4) == [([p], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]), ([5, 6, 7], [8, 9])]
    assert rolling_windows([10, 11, 12], p, 4) == [([p], [10, 11, 12])]
    assert rolling_windows(1, p, 4) == [([p], [0])]


@pytest.mark.parametrize("n,L", [(1, 1), (5, 1), (10, 4), (8, 4), (9, 4), (13, 5), (3, 8), (16, 16), (40, 6)])
def test_rolling_windows_score_every_token_once(n, L):
    p = -1
    windows = rolling_windows(n, p, L)
    predicted = [t for _, pred in windows for t in pred]
    assert predicted == list(range(n))
    assert windows[0][0] == [p]
    for context, pred in windows[1:]:
        assert 1 <= len(pred) <= L
        assert len(context) + len(pred) == L + 1  # the model reads exactly L tokens
        assert context == list(range(pred[0] - len(context), pred[0]))  # the tokens just before
    # Full windows keep one context token; only the last may be shorter with more.
    assert all(len(c) == 1 for c, pred in windows[1:] if len(pred) == L)


def test_rolling_loglikelihood_bigram_is_exact_for_any_window():
    """A bigram model needs one token of context, which every rolling window provides."""
    V, prefix = 11, 10
    model = BigramLM(V, block_size=16)
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]
    logp = torch.log_softmax(model.table.detach(), dim=-1)
    seq = [prefix] + ids
    want = sum(logp[a, b].item() for a, b in zip(seq[:-1], seq[1:]))
    for L in (1, 2, 4, 7, 16):
        assert rolling_loglikelihood(model, ids, prefix, max_length=L, batch_size=3) == pytest.approx(want, rel=1e-9)


def test_rolling_single_window_equals_full_forward(tiny_model, tiny_config):
    torch.manual_seed(5)
    ids = torch.randint(0, tiny_config.vocab_size - 1, (15,)).tolist()
    prefix = tiny_config.vocab_size - 1
    x = torch.tensor([prefix] + ids)
    with torch.no_grad():
        logp = torch.log_softmax(tiny_model(x[None, :-1])[0], dim=-1)
    want = logp[torch.arange(15), x[1:]].sum().item()
    assert rolling_loglikelihood(tiny_model, ids, prefix) == pytest.approx(want, rel=1e-5)
    # Shorter windows lose context, so a trained-looking model scores differently, but still every token.
    assert rolling_loglikelihood(tiny_model, ids, prefix, max_length=4) != pytest.approx(want, rel=1e-7)


def test_word_and_byte_metrics_by_hand():
    assert bits_per_byte([-10.0], [5]) == pytest.approx(2 / math.log(2))
    assert byte_perplexity([-10.0], [5]) == pytest.approx(math.exp(2))
    # Weighted over documents, not averaged per document: (-6 - 4) / (2 + 3) = -2.
    assert word_perplexity([-6.0, -4.0], [2, 3]) == pytest.approx(math.exp(2))
    assert count_words("the cat  sat") == 3
    assert count_words("a b\n") == 3  # re.split leaves an empty last word, as lm-eval counts it
    assert count_bytes("héllo") == 6
    with pytest.raises(ValueError, match="same length"):
        bits_per_byte([-1.0, -2.0], [3])


class ByteTokenizer:
    eot_id = 256
    vocab_size = 257

    def encode(self, text):
        return list(text.encode("utf-8"))


def test_document_perplexity_uniform():
    V = 257
    docs = ["hello world", "a longer document\nwith two lines é"]
    res = document_perplexity(ZeroLM(V, 8), ByteTokenizer(), docs, max_length=8)
    assert res["token_perplexity"] == pytest.approx(V)
    assert res["n_tokens"] == res["n_bytes"] == sum(len(d.encode()) for d in docs)
    # One byte per token: bits per byte = log2 V.
    assert res["bits_per_byte"] == pytest.approx(math.log2(V))
    n_words = 2 + 7  # "a longer document / with two lines é"
    assert res["word_perplexity"] == pytest.approx(math.exp(math.log(V) * res["n_tokens"] / n_words))
