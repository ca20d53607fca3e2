"""The GPT: causality, the two attention paths, the KV cache, initialisation and bad configs."""
import dataclasses
import math

import pytest
import torch

from minillm.model import GPT, GPTConfig


def test_logits_shape(tiny_model, tiny_config):
    x = torch.randint(0, tiny_config.vocab_size, (3, 11))
    assert tiny_model(x).shape == (3, 11, tiny_config.vocab_size)


def test_causal_no_leak(tiny_model, tiny_config):
    """Changing token t changes no logits before t, and does change logits from t on."""
    torch.manual_seed(1)
    x = torch.randint(0, tiny_config.vocab_size, (2, 16))
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % tiny_config.vocab_size
    lx, ly = tiny_model(x), tiny_model(y)
    assert torch.allclose(lx[:, :9], ly[:, :9], atol=0, rtol=0)
    assert not torch.allclose(lx[:, 9:], ly[:, 9:])


def test_sdpa_equals_explicit(tiny_model, tiny_config):
    explicit = GPT(dataclasses.replace(tiny_config, attn_impl="explicit")).eval()
    explicit.load_state_dict(tiny_model.state_dict())
    x = torch.randint(0, tiny_config.vocab_size, (2, 20))
    mask = torch.ones_like(x)
    mask[0, :5] = 0  # left padding exercises the masked path too
    assert torch.allclose(tiny_model(x), explicit(x), atol=1e-5)
    assert torch.allclose(tiny_model(x, attention_mask=mask), explicit(x, attention_mask=mask), atol=1e-5)


def test_kv_cache_logits_match_full_forward(tiny_model, tiny_config):
    x = torch.randint(0, tiny_config.vocab_size, (2, 12))
    full = tiny_model(x)
    logits, past = tiny_model(x[:, :7], use_cache=True)
    steps = [logits]
    for t in range(7, 12):
        logits, past = tiny_model(x[:, t:t + 1], past_key_values=past, use_cache=True)
        steps.append(logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_padding_does_not_change_real_tokens(tiny_model, tiny_config):
    """A left-padded row gives the same logits on its real tokens as the unpadded row."""
    from minillm.sampling import positions_from_mask

    x = torch.randint(1, tiny_config.vocab_size, (1, 8))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), x], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], dim=1)
    out = tiny_model(padded, attention_mask=mask, position_ids=positions_from_mask(mask))
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:, 4:], tiny_model(x), atol=1e-5)


def test_gpt2_init_statistics():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=500, block_size=64, n_layer=6, n_head=4, n_embd=128)
    m = GPT(cfg)
    assert m.lm_head.weight is m.wte.weight  # tied
    assert abs(m.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002
    assert abs(m.h[0].attn.c_proj.weight.std().item() - 0.02 / math.sqrt(12)) < 0.001
    assert torch.all(m.h[0].attn.c_attn.bias == 0)
    assert torch.all(m.h[0].ln_1.weight == 1)


def test_parameter_names_follow_gpt2(tiny_model):
    names = set(tiny_model.state_dict())
    for n in ["wte.weight", "wpe.weight", "h.0.ln_1.weight", "h.0.attn.c_attn.weight", "h.0.attn.c_proj.bias",
              "h.1.ln_2.bias", "h.1.mlp.c_fc.weight", "h.1.mlp.c_proj.weight", "ln_f.weight"]:
        assert n in names


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_embd=30, n_head=4), "divisible"),
    (dict(block_size=0), "block_size"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(attn_impl="flash"), "attn_impl"),
])
def test_invalid_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)


def test_position_beyond_block_size_is_an_error(tiny_model, tiny_config):
    with pytest.raises(ValueError, match="block_size"):
        tiny_model(torch.zeros(1, tiny_config.block_size + 1, dtype=torch.long))


@pytest.mark.parametrize("T_q,T_k", [(5, 5), (3, 7), (1, 4)])
def test_public_sdpa_equals_pytorchs_for_any_mask_and_shape(T_q, T_k):
    """model.scaled_dot_product_attention is F.scaled_dot_product_attention for a non-square q x k and an arbitrary
    boolean mask (every query keeps at least one key, else both give NaN rows)."""
    import torch.nn.functional as F

    from minillm.model import scaled_dot_product_attention

    g = torch.Generator().manual_seed(T_q * 10 + T_k)
    q = torch.randn(2, 3, T_q, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, T_k, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, T_k, 8, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 1, T_q, T_k, generator=g) < 0.6
    mask[..., 0] = True
    ours = scaled_dot_product_attention(q, k, v, mask)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v),
                               F.scaled_dot_product_attention(q, k, v), atol=1e-12, rtol=1e-12)
