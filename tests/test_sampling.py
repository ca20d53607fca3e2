"""Decoding: filters, greedy equivalences, seeds, the KV cache, batching and cropping."""
import torch

from minillm.sampling import filter_top_k, filter_top_p, generate, generate_completions, sample_next


def test_filter_top_k_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    out = filter_top_k(logits, 2)
    assert torch.isinf(out[0, [0, 3]]).all() and out[0, 1] == 3 and out[0, 2] == 2


def test_filter_top_p_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = filter_top_p(probs.log(), 0.7)  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: keep two
    assert torch.isfinite(out[0, :2]).all() and torch.isinf(out[0, 2:]).all()


def test_top_k_one_and_tiny_top_p_are_greedy():
    torch.manual_seed(0)
    logits = torch.randn(64, 50)
    greedy = sample_next(logits, temperature=0)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, temperature=1.0, top_k=1, generator=g), greedy)
    assert torch.equal(sample_next(logits, temperature=1.0, top_p=1e-6, generator=g), greedy)


def test_same_seed_same_sample(tiny_model):
    prompt = [[1, 2, 3]]
    a = generate(tiny_model, prompt, 20, generator=torch.Generator().manual_seed(7))
    b = generate(tiny_model, prompt, 20, generator=torch.Generator().manual_seed(7))
    c = generate(tiny_model, prompt, 20, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cache_equals_no_cache_greedy_batched_padded(tiny_model, tiny_config):
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42]]
    # 9 + 40 > block_size 32: also crosses the context limit, where the window slides.
    a = generate(tiny_model, prompts, 40, temperature=0, use_cache=True)
    b = generate(tiny_model, prompts, 40, temperature=0, use_cache=False)
    assert torch.equal(a, b)
    # Each row of the padded batch equals the row generated alone.
    for i, p in enumerate(prompts):
        alone = generate(tiny_model, [p], 40, temperature=0)
        assert alone[0, -40:].tolist() == a[i, -40:].tolist()


def test_sampling_with_cache_equals_without(tiny_model):
    kw = dict(temperature=0.8, top_k=20, top_p=0.9)
    a = generate(tiny_model, [[3, 4]], 25, use_cache=True, generator=torch.Generator().manual_seed(3), **kw)
    b = generate(tiny_model, [[3, 4]], 25, use_cache=False, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b)


def test_long_prompt_is_cropped_from_the_left(tiny_model, tiny_config):
    T = tiny_config.block_size
    long = list(range(1, T + 10))
    out = generate(tiny_model, [long], 5, temperature=0)
    cropped = generate(tiny_model, [long[-T:]], 5, temperature=0)
    assert out[0, -5:].tolist() == cropped[0, -5:].tolist()


def test_per_row_stopping(tiny_model):
    prompts = [[1, 2], [3, 4, 5]]
    free = generate(tiny_model, prompts, 12, temperature=0)
    eos = int(free[0, 2 + 1])  # row 0's 2nd generated token (of the padded batch layout, col T+1)
    out = generate(tiny_model, prompts, 12, temperature=0, eos_id=eos)
    row0 = out[0, 3:].tolist()
    k = row0.index(eos)
    assert all(t == eos for t in row0[k:])  # finished rows are filled with eos
    completions = generate_completions(tiny_model, prompts, 12, eos_id=eos, temperature=0)
    assert eos not in completions[0] and len(completions[0]) == k
