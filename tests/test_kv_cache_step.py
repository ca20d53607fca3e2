"""kv_cache_step, the decode step written out by hand: token by token it must reproduce the full forward pass."""
import pytest
import torch

from minillm.model import GPT, GPTConfig
from minillm.sampling import generate, kv_cache_step


def _model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)).eval()


def test_step_by_step_logits_equal_the_full_forward_pass():
    model = _model()
    ids = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(1))
    full = model(ids)  # (3, 10, 50)
    past = None
    for t in range(ids.shape[1]):
        logits, past = kv_cache_step(model, ids[:, t], past)
        torch.testing.assert_close(logits, full[:, t], rtol=1e-5, atol=1e-5)
    assert len(past) == 2 and past[0][0].shape == (3, 2, 10, 8)


def test_cache_equals_the_models_own_cache():
    model = _model(2)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))
    _, presents = model(ids, use_cache=True)
    past = None
    for t in range(ids.shape[1]):
        _, past = kv_cache_step(model, ids[:, t], past)
    for (k, v), (k2, v2) in zip(past, presents):
        torch.testing.assert_close(k, k2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, v2, rtol=1e-5, atol=1e-5)


def test_greedy_loop_on_the_step_equals_generate():
    model = _model(4)
    prompt = torch.tensor([[5, 17, 3]])
    past, logits = None, None
    for t in range(prompt.shape[1]):
        logits, past = kv_cache_step(model, prompt[:, t], past)
    out = prompt
    for _ in range(8):
        nxt = logits.argmax(-1)
        out = torch.cat([out, nxt[:, None]], dim=1)
        logits, past = kv_cache_step(model, nxt, past)
    assert torch.equal(out, generate(model, prompt, 8, temperature=0.0, use_cache=False))


def test_a_full_cache_is_refused():
    model = _model()
    past = None
    for t in range(16):
        _, past = kv_cache_step(model, torch.tensor([t]), past)
    with pytest.raises(ValueError, match="block_size=16"):
        kv_cache_step(model, torch.tensor([1]), past)
