"""Trainable token rows (PEFT's trainable_token_indices): E'[t] = delta, shared by the tied LM head."""
import pytest
import torch
import torch.nn as nn

from minillm.model import GPT, GPTConfig
from minillm.peft.apply import (
    adapter_parameters, apply_peft, disable_adapters, load_adapter, merge_adapters, merge_peft, save_adapter,
    unmerge_adapters,
)
from minillm.peft.tokens import TrainableTokensLayer, apply_trainable_tokens, chat_token_ids

CFG = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
IDS = [3, 47, 11]


def tiny_gpt(seed: int = 0, dtype: torch.dtype = torch.float32) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG).to(dtype).eval()


def batch() -> torch.Tensor:
    x = torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    x[0, :3] = torch.tensor(IDS)  # the chosen tokens occur in the input too
    return x


def perturb(model: nn.Module) -> None:
    with torch.no_grad():
        model.wte.tokens.delta.add_(torch.randn_like(model.wte.tokens.delta))


def test_starts_unchanged_and_only_the_rows_train():
    base, model = tiny_gpt(), apply_peft(tiny_gpt(), "lora", trainable_token_indices=IDS)
    assert torch.equal(base(batch()), model(batch()))
    assert isinstance(model.wte, TrainableTokensLayer) and model.lm_head.tokens is model.wte.tokens
    delta = model.wte.tokens.delta
    assert delta.shape == (3, CFG.n_embd) and delta.requires_grad and not model.wte.weight.requires_grad
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == lora + 3 * CFG.n_embd


def test_forward_equals_a_table_with_the_rows_replaced():
    model = apply_trainable_tokens(tiny_gpt(), IDS)
    perturb(model)
    reference = tiny_gpt()  # same seed, same base weights
    with torch.no_grad():
        reference.wte.weight[IDS] = model.wte.tokens.delta  # tied: the head reads the new rows too
    torch.testing.assert_close(model(batch()), reference(batch()), rtol=0, atol=1e-6)


def test_gradient_equals_the_full_embedding_gradient_on_those_rows():
    """d loss / d delta_k = d loss / d E[t_k] of the same model with its whole (tied) table trained."""
    model = apply_trainable_tokens(tiny_gpt(dtype=torch.float64), IDS)
    full = tiny_gpt(dtype=torch.float64)
    for m in (model, full):
        m(batch()).logsumexp(-1).sum().backward()
    torch.testing.assert_close(model.wte.tokens.delta.grad, full.wte.weight.grad[IDS])
    assert model.wte.tokens.delta.grad.abs().sum() > 0


def test_gradcheck_float64():
    model = apply_trainable_tokens(tiny_gpt(dtype=torch.float64), IDS)
    x = batch()[:, :5]

    def logits(delta: torch.Tensor) -> torch.Tensor:  # the model as a function of the trained rows
        return torch.func.functional_call(model, {"wte.tokens.delta": delta}, (x,))

    delta = model.wte.tokens.delta.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(logits, (delta,), eps=1e-6, atol=1e-5)


def test_merge_unmerge_and_merge_peft_keep_the_tie():
    model = apply_peft(tiny_gpt(), "lora", trainable_token_indices=IDS)
    perturb(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    before = model.wte.weight.detach().clone()
    want = model(batch())
    merge_adapters(model)
    torch.testing.assert_close(model(batch()), want, rtol=1e-5, atol=1e-5)
    unmerge_adapters(model)
    assert torch.equal(model.wte.weight, before)  # bit for bit
    plain = merge_peft(model)
    assert isinstance(plain.wte, nn.Embedding) and plain.lm_head.weight is plain.wte.weight
    torch.testing.assert_close(plain(batch()), want, rtol=1e-5, atol=1e-5)


def test_disable_adapters_gives_the_base_model_even_when_merged():
    base, model = tiny_gpt(), apply_peft(tiny_gpt(), "houlsby", trainable_token_indices=IDS)
    perturb(model)
    assert not torch.allclose(model(batch()), base(batch()))
    with disable_adapters(model):
        torch.testing.assert_close(model(batch()), base(batch()), rtol=0, atol=0)
    lora = apply_peft(tiny_gpt(), "lora", trainable_token_indices=IDS)
    perturb(lora)
    merge_adapters(lora)
    with disable_adapters(lora):
        torch.testing.assert_close(lora(batch()), base(batch()), rtol=0, atol=0)
    assert lora.wte.merged


@pytest.mark.parametrize("method,kw", [("prefix", {"num_virtual_tokens": 3}), ("prompt", {"num_virtual_tokens": 3}),
                                       ("last_k", {}), ("bitfit", {})])
def test_other_methods_take_the_rows_too(method, kw, tmp_path):
    model = apply_peft(tiny_gpt(), method, trainable_token_indices=IDS, **kw)
    gpt = getattr(model, "model", model)
    assert isinstance(gpt.wte, TrainableTokensLayer)
    names = set(adapter_parameters(model))
    assert any(n.endswith("wte.tokens.delta") for n in names)
    if method == "last_k":
        assert any(n.startswith("h.1.") for n in names)  # the last block still saved with the rows
    perturb(gpt)
    model(batch()).sum().backward()
    assert gpt.wte.tokens.delta.grad is not None
    save_adapter(model, tmp_path / "a.pt")
    again = load_adapter(tiny_gpt(), tmp_path / "a.pt")
    assert again.peft_config["trainable_token_indices"] == IDS
    torch.testing.assert_close(again(batch()), model(batch()), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [[3, 3], [50], [-1], "3", [], [True], [2.0]])
def test_bad_indices_raise_and_leave_the_model_untouched(bad):
    model = tiny_gpt()
    with pytest.raises(ValueError, match="trainable_token_indices"):
        apply_peft(model, "lora", trainable_token_indices=bad)
    assert isinstance(model.wte, nn.Embedding) and all(p.requires_grad for p in model.parameters())
    assert not hasattr(model, "peft_config")


def test_chat_token_ids_are_the_template_tokens():
    from minillm.tokenizer import Tokenizer

    tok = Tokenizer.load("data/tokenizer")
    ids, _ = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}])
    assert {tok.user_id, tok.assistant_id, tok.end_id} <= set(ids)
    assert set(chat_token_ids(tok)) == {tok.system_id, tok.user_id, tok.assistant_id, tok.end_id}
