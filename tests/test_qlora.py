"""Linear4bit, quantize_model, QLoRALinear and LoftQ (minillm.peft.qlora, minillm.peft.loftq)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.peft.loftq import loftq_init, loftq_linear, low_rank_factors
from minillm.peft.lora import LoRALinear
from minillm.peft.qlora import Linear4bit, QLoRALinear, _DequantizeLinear, quantize_model, quantized_layers
from minillm.quant.nf4 import dequantize_4bit, quantize_4bit
from minillm.utils import atomic_torch_save, safe_torch_load


class TinyNet(nn.Module):
    """GPT-2-like names: embeddings and a head that quantize_model must skip."""

    def __init__(self, d: int = 64, vocab: int = 50) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(d, 3 * d)
        self.attn.c_proj = nn.Linear(3 * d, d, bias=False)
        self.ln = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx)
        x = x + self.attn.c_proj(F.gelu(self.attn.c_attn(x)))
        return self.lm_head(self.ln(x))


# ------------------------------------------------------------------ Linear4bit


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_linear4bit_forward_equals_linear_with_dequantized_weight(quant_type, double_quant, bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=bias)
    layer = Linear4bit.from_linear(linear, quant_type=quant_type, double_quant=double_quant)
    assert (layer.in_features, layer.out_features) == (96, 40)
    W = dequantize_4bit(quantize_4bit(linear.weight.detach(), 64, quant_type, double_quant))
    x = torch.randn(2, 3, 96)
    assert torch.equal(layer(x), F.linear(x, W, linear.bias))
    assert torch.equal(layer.dequantize(), W)
    # lossy, but within half the largest gap between codes (FP4: (1 - 2/3) / 2) times the absmax
    assert 0 < (W - linear.weight).abs().max() <= linear.weight.abs().max() / 6
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == 96 * 40 // 2
    assert all(not p.requires_grad for p in layer.parameters())


def test_linear4bit_from_weight_and_bias():
    torch.manual_seed(1)
    W, b = torch.randn(8, 64), torch.randn(8)
    layer = Linear4bit(W, b, blocksize=32, double_quant=False)
    x = torch.randn(5, 64)
    assert torch.equal(layer(x), F.linear(x, layer.dequantize(), b))
    assert layer.blocksize == 32 and layer.weight_absmax.numel() == 8 * 64 // 32


def test_compute_dtype_and_output_dtype():
    torch.manual_seed(2)
    linear = nn.Linear(64, 32)
    layer = Linear4bit(linear, compute_dtype=torch.bfloat16)
    x = torch.randn(4, 64)
    y = layer(x)
    assert y.dtype == torch.float32  # cast back to the input's dtype
    expected = F.linear(x.bfloat16(), layer.dequantize(torch.bfloat16), linear.bias.bfloat16()).float()
    assert torch.equal(y, expected)
    assert not torch.equal(y, Linear4bit(linear)(x))  # bf16 compute really happened
    # without compute_dtype the input's dtype is used
    assert Linear4bit(linear)(x.bfloat16()).dtype == torch.bfloat16


def test_gradcheck_float64():
    torch.manual_seed(3)
    layer = Linear4bit(torch.randn(4, 24, dtype=torch.float64), blocksize=16)
    state = layer.quant_state
    x = torch.randn(2, 24, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: _DequantizeLinear.apply(x, state, b), (x, b))
    y = layer(x)
    y.backward(torch.ones_like(y))
    assert torch.allclose(x.grad, torch.ones(2, 4, dtype=torch.float64) @ layer.dequantize())


def test_backward_does_not_keep_the_dequantized_weight():
    layer = Linear4bit(nn.Linear(128, 64))
    saved = []
    x = torch.randn(2, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = layer(x)
    assert torch.Size((64, 128)) not in saved  # re-dequantised in backward instead
    y.sum().backward()
    assert x.grad is not None


def test_to_bfloat16_casts_bias_but_not_the_scales():
    layer = Linear4bit(nn.Linear(64, 16))
    before = layer.dequantize(torch.float32)
    layer.to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16
    assert layer.weight_absmax_scale.dtype == torch.float32 and layer.weight_code.dtype == torch.float32
    assert torch.equal(layer.dequantize(torch.float32), before)


def test_nbytes_of_the_layer():
    layer = Linear4bit(nn.Linear(256, 128), double_quant=False)
    assert layer.nbytes == 256 * 128 // 2 + 4 * 256 * 128 // 64
    assert layer.quant_state.bits_per_param == 4.5


# ------------------------------------------------------------------ quantize_model and state dicts


def test_quantize_model_replaces_linears_except_skipped():
    torch.manual_seed(4)
    model = TinyNet()
    idx = torch.randint(0, 50, (2, 7))
    before = model(idx)
    quantize_model(model)
    names = sorted(name for name, _ in quantized_layers(model))
    assert names == ["attn.c_attn", "attn.c_proj"]
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.wte, nn.Embedding)
    after = model(idx)
    assert after.shape == before.shape and 0 < (after - before).abs().max() < 0.2 * before.abs().max()
    assert [name for name, _ in quantized_layers(quantize_model(TinyNet(), skip=("c_attn",)))] == [
        "attn.c_proj", "lm_head"]


def test_quantizing_twice_is_an_error():
    model = quantize_model(TinyNet())
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model)
    with pytest.raises(TypeError, match="already quantized"):
        Linear4bit(model.attn.c_attn)
    with pytest.raises(TypeError, match="nn.Linear"):
        Linear4bit.from_linear(model.attn.c_attn)


def test_quantized_state_dict_round_trip(tmp_path):
    torch.manual_seed(5)
    source = quantize_model(TinyNet())
    path = tmp_path / "q.pt"
    atomic_torch_save(source.state_dict(), path)
    torch.manual_seed(6)
    target = quantize_model(TinyNet())  # other random weights, same shapes
    idx = torch.randint(0, 50, (3, 5))
    assert not torch.equal(target(idx), source(idx))
    target.load_state_dict(safe_torch_load(path))
    assert torch.equal(target(idx), source(idx))
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert torch.equal(a, b), name


def test_loading_another_quant_type_or_layout_fails():
    nf4_model, fp4_model = quantize_model(TinyNet()), quantize_model(TinyNet(), quant_type="fp4")
    with pytest.raises(RuntimeError, match="code table"):
        nf4_model.load_state_dict(fp4_model.state_dict())
    with pytest.raises(RuntimeError, match="weight_absmax"):
        nf4_model.load_state_dict(quantize_model(TinyNet(), double_quant=False).state_dict())


def test_bad_linear4bit_arguments():
    with pytest.raises(TypeError, match="nn.Linear or a weight"):
        Linear4bit("weights")
    with pytest.raises(ValueError, match="2-D"):
        Linear4bit(torch.randn(64))
    with pytest.raises(ValueError, match="bias shape"):
        Linear4bit(torch.randn(4, 64), torch.randn(5))
    with pytest.raises(ValueError, match="either an nn.Linear"):
        Linear4bit(nn.Linear(64, 4), torch.randn(4))
    with pytest.raises(TypeError, match="compute_dtype"):
        Linear4bit(nn.Linear(64, 4), compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="blocksize"):
        Linear4bit(nn.Linear(64, 4), blocksize=60)
    with pytest.raises(ValueError, match="in_features=64"):
        Linear4bit(nn.Linear(64, 4))(torch.randn(2, 63))
    with pytest.raises(TypeError, match="collection of names"):
        quantize_model(TinyNet(), skip="lm_head")


# ------------------------------------------------------------------ QLoRA


def test_qlora_equals_lora_on_the_dequantized_weight_and_trains_only_lora():
    torch.manual_seed(7)
    linear = nn.Linear(64, 48)
    qlora = QLoRALinear(linear, r=4, lora_alpha=8)
    assert isinstance(qlora, LoRALinear) and isinstance(qlora.base, Linear4bit)
    with torch.no_grad():
        qlora.lora_B.normal_()  # a trained-looking B, so that A receives a gradient too
    plain = nn.Linear(64, 48)
    with torch.no_grad():
        plain.weight.copy_(qlora.base.dequantize())
        plain.bias.copy_(linear.bias)
    lora = LoRALinear(plain, r=4, lora_alpha=8)
    with torch.no_grad():
        lora.lora_A.copy_(qlora.lora_A)
        lora.lora_B.copy_(qlora.lora_B)
    x = torch.randn(3, 64)
    y_q, y_l = qlora(x), lora(x)
    assert torch.allclose(y_q, y_l, atol=1e-6)
    (y_q ** 2).sum().backward()
    (y_l ** 2).sum().backward()
    trainable = {name for name, p in qlora.named_parameters() if p.requires_grad}
    assert trainable == {"adapters.default.lora_A", "adapters.default.lora_B"}
    assert qlora.base.bias.grad is None
    assert torch.allclose(qlora.lora_A.grad, lora.lora_A.grad, atol=1e-5)
    assert torch.allclose(qlora.lora_B.grad, lora.lora_B.grad, atol=1e-5)
    assert qlora.lora_A.grad.abs().sum() > 0


def test_qlora_on_a_gpt_trains_only_adapters(tiny_model):
    from minillm.peft.apply import apply_peft

    model = apply_peft(quantize_model(tiny_model), "lora", target_modules=["c_attn"], r=4, lora_alpha=8)
    assert len(quantized_layers(model)) == 4 * tiny_model.config.n_layer  # c_attn, c_proj, c_fc, mlp.c_proj
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.wte.weight
    idx = torch.randint(0, tiny_model.config.vocab_size, (2, 9))
    model(idx).pow(2).mean().backward()  # logits (B, T, vocab)
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in name for name in with_grad)
    assert any(name.endswith("lora_B") for name in with_grad)


# ------------------------------------------------------------------ LoftQ


def test_loftq_one_iteration_is_qlora_plus_best_rank_r_fix():
    torch.manual_seed(8)
    W = torch.randn(96, 128) * 0.02
    Q, A, B = loftq_init(W, r=8, num_iters=1, scaling=2.0)
    assert A.shape == (8, 128) and B.shape == (96, 8)
    assert torch.equal(Q.packed, quantize_4bit(W).packed)  # T = 1: the same quantised weight as QLoRA
    residual = W - dequantize_4bit(Q)
    S = torch.linalg.svdvals(residual)
    loftq_error = (residual - 2.0 * B @ A).norm()
    assert loftq_error.item() == pytest.approx(S[8:].square().sum().sqrt().item(), rel=1e-4)  # Eckart-Young
    assert loftq_error < residual.norm()


@pytest.mark.parametrize("num_iters", [1, 3])
def test_loftq_error_below_qlora(num_iters):
    torch.manual_seed(9)
    W = torch.randn(64, 160) * 0.02 + 0.01 * torch.randn(64, 2) @ torch.randn(2, 160)
    qlora_error = (W - dequantize_4bit(quantize_4bit(W))).norm()
    Q, A, B = loftq_init(W, r=4, num_iters=num_iters, scaling=0.5)
    assert (W - (dequantize_4bit(Q) + 0.5 * B @ A)).norm() < 0.95 * qlora_error


def test_low_rank_factors_scaling_convention():
    torch.manual_seed(10)
    M = torch.randn(5, 3) @ torch.randn(3, 7)  # rank 3
    A, B = low_rank_factors(M, r=3, scaling=4.0)
    assert torch.allclose(4.0 * B @ A, M, atol=1e-5)
    assert torch.allclose(A.norm(dim=1), B.norm(dim=0), rtol=1e-4)  # symmetric split of sqrt(S)


def test_loftq_linear_starts_closer_to_the_original_than_qlora():
    torch.manual_seed(11)
    linear = nn.Linear(128, 64)
    x = torch.randn(16, 128)
    loftq = loftq_linear(linear, r=8, lora_alpha=16, num_iters=2)
    qlora = QLoRALinear(linear, r=8, lora_alpha=16)
    assert isinstance(loftq.base, Linear4bit) and loftq.scaling == 2.0
    target = linear(x)
    assert (loftq(x) - target).norm() < (qlora(x) - target).norm()
    assert {n for n, p in loftq.named_parameters() if p.requires_grad} == {
        "adapters.default.lora_A", "adapters.default.lora_B"}


def test_loftq_bad_input():
    W = torch.randn(8, 64)
    with pytest.raises(ValueError, match="r must be"):
        loftq_init(W, r=0)
    with pytest.raises(ValueError, match="r must be"):
        loftq_init(W, r=9)
    with pytest.raises(ValueError, match="num_iters"):
        loftq_init(W, r=2, num_iters=0)
    with pytest.raises(ValueError, match="2-D floating"):
        loftq_init(torch.ones(8, 64, dtype=torch.int32), r=2)
    with pytest.raises(ValueError, match="scaling"):
        loftq_init(W, r=2, scaling=0.0)
    with pytest.raises(TypeError, match="nn.Linear"):
        loftq_linear(Linear4bit(nn.Linear(64, 8)))
