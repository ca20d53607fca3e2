"""Prefix and prompt tuning: equivalence with a real context, positions, masks, KV-cache generation."""
import pytest
import torch

from minillm.model import GPT, GPTConfig
from minillm.peft.apply import apply_peft, count_parameters
from minillm.peft.prefix import PrefixTunedGPT, PromptTunedGPT
from minillm.sampling import generate

CFG = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def table_from_key_values(presents) -> torch.Tensor:
    """Inverse of PrefixTunedGPT.prefix_key_values: [(k, v)] per layer (1, H, P, D) -> (P, 2 L d)."""
    kv = torch.stack([t[0] for pair in presents for t in pair])  # (2L, H, P, D)
    P = kv.shape[2]
    return kv.permute(2, 0, 1, 3).reshape(P, -1)  # (P, 2L, H, D) -> (P, 2 L d)


def test_prefix_from_real_context_equals_running_the_context():
    """A prefix holding the keys/values of real tokens s acts exactly like s written before x."""
    gpt = tiny_gpt()
    s, x = torch.tensor([[3, 14, 15, 9]]), torch.randint(0, 50, (2, 6))
    _, presents = gpt(s, use_cache=True)
    wrapped = PrefixTunedGPT(gpt, num_virtual_tokens=4)
    with torch.no_grad():
        wrapped.prefix.copy_(table_from_key_values(presents))
    expected = gpt(torch.cat([s.expand(2, -1), x], dim=1))[:, 4:]
    torch.testing.assert_close(wrapped(x), expected, atol=1e-5, rtol=1e-5)
    # With a mask and explicit positions (counted over real tokens) the result is the same.
    mask = torch.ones(2, 6, dtype=torch.long)
    torch.testing.assert_close(wrapped(x, attention_mask=mask, position_ids=torch.arange(6)), expected,
                               atol=1e-5, rtol=1e-5)


def test_prefix_left_padding_matches_unpadded():
    wrapped = PrefixTunedGPT(tiny_gpt(), num_virtual_tokens=3)
    short = torch.tensor([[7, 8, 9]])
    padded = torch.tensor([[0, 0, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    torch.testing.assert_close(wrapped(padded, attention_mask=mask, position_ids=pos)[:, 2:], wrapped(short),
                               atol=1e-5, rtol=1e-5)


def test_prefix_generation_with_cache_equals_without():
    wrapped = PrefixTunedGPT(tiny_gpt(), num_virtual_tokens=4)
    assert wrapped.config.block_size == CFG.block_size - 4
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    # 12 new tokens: the window slides past the 12 real positions left by the prefix.
    with_cache = generate(wrapped, prompts, max_new_tokens=12, temperature=0.0, use_cache=True)
    without = generate(wrapped, prompts, max_new_tokens=12, temperature=0.0, use_cache=False)
    assert torch.equal(with_cache, without)
    plain = generate(wrapped.model, prompts, max_new_tokens=12, temperature=0.0)
    assert not torch.equal(with_cache, plain)  # the prefix does change what is generated


def test_prefix_parameter_count_and_gradients():
    gpt = tiny_gpt()
    wrapped = apply_peft(gpt, "prefix", num_virtual_tokens=5)
    trainable, total = count_parameters(wrapped)
    assert trainable == 2 * CFG.n_layer * 5 * CFG.n_embd
    assert total == gpt.num_parameters() + trainable
    wrapped(torch.randint(0, 50, (2, 4))).logsumexp(-1).sum().backward()
    assert wrapped.prefix.grad is not None and wrapped.prefix.grad.abs().sum() > 0
    assert all(p.grad is None for p in gpt.parameters())


def test_prefix_layout_matches_peft_view():
    """Layer l reads entry 2l of the (P, 2L, H, D) view as keys and 2l + 1 as values."""
    wrapped = PrefixTunedGPT(tiny_gpt(), num_virtual_tokens=3)
    view = wrapped.prefix.view(3, 4, 2, 8)  # (P, 2L, H, D)
    kv = wrapped.prefix_key_values()
    assert kv[1][0].shape == (1, 2, 3, 8)
    assert torch.equal(kv[1][0][0], view[:, 2].transpose(0, 1))
    assert torch.equal(kv[1][1][0], view[:, 3].transpose(0, 1))


def test_prefix_reparameterization_and_fold():
    gpt = tiny_gpt()
    wrapped = PrefixTunedGPT(gpt, num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=10)
    trainable, _ = count_parameters(wrapped)
    d, L = CFG.n_embd, CFG.n_layer
    assert trainable == 3 * d + (d * 10 + 10) + (10 * 2 * L * d + 2 * L * d)
    x = torch.randint(0, 50, (2, 5))
    y = wrapped(x)
    wrapped(x).sum().backward()
    assert wrapped.prefix_mlp[0].weight.grad.abs().sum() > 0
    wrapped.fold_reparameterization()
    assert not hasattr(wrapped, "prefix_mlp") and wrapped.prefix.shape == (3, 2 * L * d)
    torch.testing.assert_close(wrapped(x), y)
    assert count_parameters(wrapped)[0] == 2 * L * 3 * d


def test_prefix_zero_init_and_bad_length():
    wrapped = PrefixTunedGPT(tiny_gpt(), num_virtual_tokens=2, init_weights="zero")
    assert torch.count_nonzero(wrapped.prefix) == 0
    with pytest.raises(ValueError, match="block_size"):
        PrefixTunedGPT(tiny_gpt(), num_virtual_tokens=16)
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PrefixTunedGPT(tiny_gpt(), num_virtual_tokens=0)


def test_prefix_disabled_is_base():
    wrapped = PrefixTunedGPT(tiny_gpt(), num_virtual_tokens=2)
    x = torch.randint(0, 50, (1, 5))
    wrapped.disabled = True
    torch.testing.assert_close(wrapped(x), wrapped.model(x))


# ---------------------------------------------------------------------- prompt tuning
def test_prompt_from_text_equals_running_the_text():
    gpt = tiny_gpt()
    text = [11, 12, 13]
    wrapped = PromptTunedGPT(gpt, num_virtual_tokens=3, prompt_init="text", init_token_ids=text)
    x = torch.randint(0, 50, (2, 5))
    logits = wrapped(x)
    assert logits.shape == (2, 5, 50)  # real positions only
    expected = gpt(torch.cat([torch.tensor([text] * 2), x], dim=1))[:, 3:]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_prompt_text_init_cut_or_repeated():
    gpt = tiny_gpt()
    repeated = PromptTunedGPT(gpt, num_virtual_tokens=5, prompt_init="text", init_token_ids=[4, 9])
    assert torch.equal(repeated.prompt, gpt.wte.weight[[4, 9, 4, 9, 4]])
    cut = PromptTunedGPT(gpt, num_virtual_tokens=2, prompt_init="text", init_token_ids=[4, 9, 7])
    assert torch.equal(cut.prompt, gpt.wte.weight[[4, 9]])
    with pytest.raises(ValueError, match="init_token_ids"):
        PromptTunedGPT(gpt, num_virtual_tokens=2, prompt_init="text", init_token_ids=[50])
    with pytest.raises(ValueError, match="init_token_ids"):
        PromptTunedGPT(gpt, num_virtual_tokens=2, prompt_init="text")


def test_prompt_sample_vocab_and_random_init():
    gpt = tiny_gpt()
    sampled = PromptTunedGPT(gpt, 6, prompt_init="sample_vocab", generator=torch.Generator().manual_seed(0))
    for row in sampled.prompt:
        assert (gpt.wte.weight == row).all(dim=1).any()
    rand = PromptTunedGPT(gpt, 6, generator=torch.Generator().manual_seed(0))
    assert 0.5 < rand.prompt.std() < 1.5  # N(0, 1), not a vocabulary row (std 0.02)


def test_prompt_generation_with_cache_equals_without_and_gradients():
    wrapped = apply_peft(tiny_gpt(), "prompt", num_virtual_tokens=3)
    prompts = [[1, 2], [3, 4, 5, 6]]
    with_cache = generate(wrapped, prompts, max_new_tokens=15, temperature=0.0, use_cache=True)
    without = generate(wrapped, prompts, max_new_tokens=15, temperature=0.0, use_cache=False)
    assert torch.equal(with_cache, without)
    assert count_parameters(wrapped)[0] == 3 * CFG.n_embd
    wrapped(torch.randint(0, 50, (2, 4))).logsumexp(-1).sum().backward()
    assert wrapped.prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in wrapped.model.parameters())


def test_prompt_left_padding_matches_unpadded():
    wrapped = PromptTunedGPT(tiny_gpt(), num_virtual_tokens=2)
    mask = torch.tensor([[0, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = wrapped(torch.tensor([[0, 7, 8, 9]]), attention_mask=mask, position_ids=pos)
    torch.testing.assert_close(out[:, 1:], wrapped(torch.tensor([[7, 8, 9]])), atol=1e-5, rtol=1e-5)
