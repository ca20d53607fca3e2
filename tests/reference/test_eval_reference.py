"""Perplexity and log-likelihoods against a Hugging Face `transformers` GPT-2 (random small config, no download).

The HF model is the reference: its logits, its built-in shifted loss (the HF perplexity guide's loop)
and lm-eval's request layout computed on it must give the numbers our functions give on the same
weights loaded through `from_hf_gpt2`.
"""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from minillm.eval.loglik import loglikelihood  # noqa: E402
from minillm.eval.perplexity import perplexity, rolling_loglikelihood, rolling_windows  # noqa: E402
from minillm.hf_gpt2 import from_hf_gpt2

VOCAB, N_POS = 97, 16


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=N_POS, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    ours = from_hf_gpt2(hf.state_dict(), cfg.to_dict()).eval()
    return hf, ours


class ModTokenizer:
    eot_id = VOCAB - 1

    def encode(self, text):
        return [ord(c) % (VOCAB - 1) for c in text]


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """log p(. | x_<=t) for every position t of one sequence: (T, V)."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), dim=-1)


def test_disjoint_windows_match_the_hf_guide_loop(models):
    """With stride == max_length the guide's accounting (loss x (valid labels - 1)) is exact: compare PPL."""
    hf, ours = models
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, 70))
    max_length = stride = N_POS
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, ids.size(1), stride):
            end = min(begin + max_length, ids.size(1))
            trg_len = end - prev_end
            input_ids = ids[:, begin:end]
            target_ids = input_ids.clone()
            target_ids[:, :-trg_len] = -100
            loss = hf(input_ids, labels=target_ids).loss
            num_loss_tokens = int((target_ids != -100).sum()) - target_ids.size(0)
            nll_sum += loss.item() * num_loss_tokens
            n_tokens += num_loss_tokens
            prev_end = end
            if end == ids.size(1):
                break
    res = perplexity(ours, ids[0], max_length=max_length, stride=stride)
    assert res["n_tokens"] == n_tokens
    assert res["ppl"] == pytest.approx(math.exp(nll_sum / n_tokens), rel=1e-5)


def test_overlapping_windows_match_hf_logits(models):
    hf, ours = models
    torch.manual_seed(2)
    ids = torch.randint(0, VOCAB, (53,)).tolist()
    L, stride = N_POS, 6
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + L, len(ids))
        logp = hf_logprobs(hf, ids[begin:end])
        for i in range(max(prev_end, begin + 1), end):
            total += logp[i - begin - 1, ids[i]].item()
            count += 1
        prev_end = end
        if end == len(ids):
            break
    res = perplexity(ours, ids, max_length=L, stride=stride, batch_size=4)
    assert res["n_tokens"] == count == len(ids) - 1
    assert res["nll"] == pytest.approx(-total / count, rel=1e-5)


def test_loglikelihood_matches_hf(models):
    hf, ours = models
    tok = ModTokenizer()
    requests = [("The capital of Oakvale is", " Elm"), ("2 + 2 =", " 4"), ("Answer: ", "B"),
                ("a very long context that does not fit in sixteen positions at all", " end"), ("", "hello")]
    got = loglikelihood(ours, tok, requests, batch_size=2)
    for (context, continuation), (ll, greedy) in zip(requests, got):
        if context == "":
            ctx_enc, cont_enc = [tok.eot_id], tok.encode(continuation)
        else:
            n_spaces = len(context) - len(context.rstrip())
            ctx = context[:len(context) - n_spaces]
            cont = context[len(ctx):] + continuation
            ctx_enc = tok.encode(ctx)
            cont_enc = tok.encode(ctx + cont)[len(ctx_enc):]
        inp = (ctx_enc + cont_enc)[-(N_POS + 1):][:-1]
        logp = hf_logprobs(hf, inp)
        rows = logp[len(inp) - len(cont_enc):]
        want = sum(rows[j, t].item() for j, t in enumerate(cont_enc))
        assert ll == pytest.approx(want, rel=1e-5)
        assert greedy == bool((rows.argmax(-1) == torch.tensor(cont_enc)).all())


def test_rolling_loglikelihood_matches_hf(models):
    hf, ours = models
    torch.manual_seed(3)
    ids = torch.randint(0, VOCAB - 1, (40,)).tolist()
    prefix = VOCAB - 1
    want = 0.0
    for context, predicted in rolling_windows(ids, prefix, N_POS):
        inp = (context + predicted)[:-1]
        logp = hf_logprobs(hf, inp)
        want += sum(logp[len(inp) - len(predicted) + j, t].item() for j, t in enumerate(predicted))
    assert rolling_loglikelihood(ours, ids, prefix, batch_size=2) == pytest.approx(want, rel=1e-5)
