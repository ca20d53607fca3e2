"""beam_search: greedy at width 1, the exhaustive optimum when the beams cover every prefix, scores that a
forward pass without the cache reproduces, and a toy where greedy misses the best sequence."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minillm.model import GPT, GPTConfig
from minillm.sampling import beam_search, beam_search_completions, generate


def _gpt(seed: int, vocab: int = 6) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=12, n_layer=2, n_head=2, n_embd=16)).eval()
    with torch.no_grad():  # sharper distributions than the 0.02 init, so the search matters
        model.ln_f.weight.mul_(3)
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(2)
    return model


def _score(model, prompt: list[int], new: list[int], lp: float) -> float:
    """sum_t log p(new_t | prompt, new_<t) / len(new) ** lp, by a forward pass without the cache."""
    ids = torch.tensor([prompt + new])
    logp = F.log_softmax(model(ids)[0].double(), dim=-1)
    total = sum(logp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(new))
    return total / len(new) ** lp


def _exhaustive(model, prompt, n, lp, eos):
    """Every continuation: n tokens without eos, or ending at its first eos."""
    V = model.config.vocab_size
    best = None
    for k in range(1, n + 1):
        for seq in itertools.product(range(V), repeat=k):
            ends = eos is not None and seq[-1] == eos
            if eos is not None and eos in seq[:-1]:
                continue
            if k < n and not ends:
                continue
            s = _score(model, prompt, list(seq), lp)
            if best is None or s > best[0]:
                best = (s, list(seq))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lp,eos", [(1.0, None), (0.0, 2), (1.0, 2), (2.0, 2)])
def test_beams_covering_every_prefix_find_the_exhaustive_optimum(seed, lp, eos):
    model = _gpt(seed)
    prompt = [1, 4, 3]
    tokens, scores = beam_search(model, torch.tensor([prompt]), beam_width=6, max_new_tokens=2,
                                 length_penalty=lp, eos_id=eos)
    best_score, best_seq = _exhaustive(model, prompt, 2, lp, eos)
    new = tokens[0, 3:].tolist()
    if eos is not None and eos in new:
        new = new[: new.index(eos) + 1]
    assert new == best_seq
    assert scores[0].item() == pytest.approx(best_score, abs=1e-4)


def test_width_one_is_greedy():
    model = _gpt(3, vocab=11)
    idx = torch.tensor([[1, 2, 3], [7, 7, 0], [5, 9, 10]])
    tokens, _ = beam_search(model, idx, beam_width=1, max_new_tokens=8)
    assert torch.equal(tokens, generate(model, idx, 8, temperature=0.0))
    # with an eos and no length normalisation too
    tokens, _ = beam_search(model, idx, beam_width=1, max_new_tokens=8, length_penalty=0.0, eos_id=4)
    assert torch.equal(tokens, generate(model, idx, 8, temperature=0.0, eos_id=4))


@pytest.mark.parametrize("lp", [0.0, 1.0])
def test_scores_equal_a_forward_pass_without_the_cache(lp):
    model = _gpt(5, vocab=9)
    idx = torch.tensor([[1, 2], [3, 8], [0, 0]])
    tokens, scores = beam_search(model, idx, beam_width=4, max_new_tokens=7, length_penalty=lp, eos_id=6)
    for b in range(3):
        new = tokens[b, 2:].tolist()
        if 6 in new:
            new = new[: new.index(6) + 1]
        assert scores[b].item() == pytest.approx(_score(model, idx[b].tolist(), new, lp), abs=1e-4)
    # and batching rows together changes nothing
    for b in range(3):
        t1, s1 = beam_search(model, idx[b:b + 1], beam_width=4, max_new_tokens=7, length_penalty=lp, eos_id=6)
        assert torch.equal(t1[0], tokens[b, : t1.shape[1]]) and s1[0].item() == pytest.approx(scores[b].item())


class Bigram(nn.Module):
    """A toy with a KV-cache-shaped state: the next-token distribution depends on the last token only."""

    def __init__(self, probs: torch.Tensor) -> None:
        super().__init__()
        self.config = GPTConfig(vocab_size=probs.shape[0], block_size=16, n_layer=1, n_head=1, n_embd=1)
        self.logits = nn.Parameter(probs.log())

    def forward(self, idx, past_key_values=None, use_cache=False):
        hist = idx[:, None, :, None].float()
        if past_key_values is not None:
            hist = torch.cat([past_key_values[0][0], hist], dim=2)
        logits = self.logits[idx]  # (B, T, V)
        return (logits, [(hist, hist)]) if use_cache else logits


def test_beam_finds_the_sequence_greedy_misses():
    # from token 0: A=1 (0.6) then anything (0.25 each), or B=2 (0.4) then C=3 (0.97)
    probs = torch.full((4, 4), 0.25)
    probs[0] = torch.tensor([0.0001, 0.6, 0.3998, 0.0001])
    probs[2] = torch.tensor([0.01, 0.01, 0.01, 0.97])
    model = Bigram(probs)
    greedy, greedy_score = beam_search(model, torch.tensor([[0]]), 1, 2, length_penalty=0.0)
    beam, beam_score = beam_search(model, torch.tensor([[0]]), 2, 2, length_penalty=0.0)
    assert greedy[0, 1:].tolist()[0] == 1 and beam[0, 1:].tolist() == [2, 3]
    assert beam_score.item() == pytest.approx(math.log(0.3998 * 0.97), abs=1e-6)
    assert greedy_score.item() == pytest.approx(math.log(0.6 * 0.25), abs=1e-6)


def test_completions_group_prompts_of_different_lengths():
    model = _gpt(7, vocab=9)
    prompts = [[1, 2, 3], [4], [5, 6, 7], [8, 1]]
    outs, scores = beam_search_completions(model, prompts, beam_width=3, max_new_tokens=5, eos_id=0)
    for p, o, s in zip(prompts, outs, scores):
        t, s1 = beam_search(model, torch.tensor([p]), 3, 5, eos_id=0)
        row = t[0, len(p):].tolist()
        assert o == (row[: row.index(0)] if 0 in row else row) and s == pytest.approx(s1.item())


@pytest.mark.parametrize("kwargs,match", [
    ({"beam_width": 0}, "beam_width"), ({"beam_width": 7}, "vocab_size=6"), ({"beam_width": 2.0}, "beam_width"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": 10}, "block_size=12"),
])
def test_bad_arguments_are_refused(kwargs, match):
    args = {"beam_width": 2, "max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        beam_search(_gpt(0), torch.tensor([[1, 2, 3]]), **args)


def test_an_eos_outside_the_w_best_extensions_does_not_finish():
    # from 0: token 1 (0.6) or eos 3 (0.4); after 1 every token is 0.25. The lone eos would score log 0.4, better
    # than any two-token path, but with one beam it ranks second and is never a hypothesis: width 1 stays greedy.
    probs = torch.full((4, 4), 0.25)
    probs[0] = torch.tensor([0.0, 0.6, 0.0, 0.4]) + 1e-9
    tokens, score = beam_search(Bigram(probs), torch.tensor([[0]]), 1, 2, length_penalty=0.0, eos_id=3)
    assert tokens[0, 1].item() == 1
    tokens, score = beam_search(Bigram(probs), torch.tensor([[0]]), 2, 2, length_penalty=0.0, eos_id=3)
    assert tokens[0, 1:].tolist() == [3] and score.item() == pytest.approx(math.log(0.4), abs=1e-6)


def test_an_early_stop_never_returns_an_unfinished_beam():
    # found in review: with length_penalty < 0 a beam still alive at an early stop, scored at its short length,
    # beat the finished ones ([3, 3, 3] at -7.139 instead of [3, 3, 2] at -7.227)
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=5, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(2)
    tokens, score = beam_search(model, torch.tensor([[2, 0, 3]]), 2, 6, length_penalty=-0.5, eos_id=2)
    new = tokens[0, 3:].tolist()
    assert new[: new.index(2) + 1] == [3, 3, 2] if 2 in new else len(new) == 6
    assert score.item() == pytest.approx(_score(model, [2, 0, 3], [3, 3, 2], -0.5), abs=1e-4)
