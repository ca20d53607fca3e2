"""Byte accounting (minillm.memory): live models, optimizers, quantized layers, and the analytic table."""

import pytest
import torch
import torch.nn as nn

from minillm.memory import (
    MODEL_PRESETS, GiB, buffer_bytes, format_memory_table, gpt2_param_count, grad_bytes, memory_table, nf4_bytes,
    optimizer_state_bytes, param_bytes, quantized_weight_bytes, training_memory,
)
from minillm.peft.qlora import quantize_model
from minillm.quant.nf4 import quantize_4bit


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))
    return model


def test_param_and_grad_bytes_by_hand():
    model = small_model()
    assert param_bytes(model) == (3 * 4 + 4 + 4 * 2) * 4
    model[0].requires_grad_(False)
    assert param_bytes(model, trainable_only=True) == 8 * 4
    assert grad_bytes(model) == 8 * 4
    model(torch.randn(5, 3)).sum().backward()
    assert grad_bytes(model) == sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                                    if p.grad is not None)
    model.half()
    assert param_bytes(model) == (12 + 4 + 8) * 2


def test_tied_weight_counted_once_and_buffers():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    assert param_bytes(model) == 40 * 4
    model.register_buffer("mask", torch.ones(7, dtype=torch.bool))
    assert buffer_bytes(model) == 7


def test_optimizer_state_bytes_predicted_and_measured():
    model = small_model()
    n = sum(p.numel() for p in model.parameters())
    assert optimizer_state_bytes(model) == 2 * 4 * n  # AdamW: m and v in fp32
    assert optimizer_state_bytes(model, "sgd") == 0 and optimizer_state_bytes(model, "sgd_momentum") == 4 * n
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert optimizer_state_bytes(opt) == 2 * 4 * n  # before its first step: the prediction
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    n_tensors = len(list(model.parameters()))
    step_bytes = sum(s["step"].numel() * s["step"].element_size() for s in opt.state.values())
    assert step_bytes == 4 * n_tensors  # one fp32 step counter per parameter tensor
    assert optimizer_state_bytes(opt) == 2 * 4 * n + step_bytes
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert optimizer_state_bytes(sgd) == 4 * n


def test_quantized_weight_bytes_and_nf4_bytes():
    for n, double_quant in [(4096, True), (4096, False), (131, True), (64 * 256 * 3 + 5, True), (1, False)]:
        q = quantize_4bit(torch.randn(n), double_quant=double_quant)
        assert nf4_bytes(n, double_quant=double_quant) == q.nbytes
    model = quantize_model(nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64, bias=False)))
    expected = nf4_bytes(64 * 128) * 2
    assert quantized_weight_bytes(model) == expected
    # buffers hold the same bytes plus the code tables (16 + 256 fp32 per layer)
    assert buffer_bytes(model) == expected + 2 * (16 + 256) * 4
    assert param_bytes(model) == 128 * 4  # only the (frozen) bias is still a parameter


def test_training_memory_sums_its_parts():
    model = small_model()
    mem = training_memory(model)
    assert mem["total"] == mem["params"] + mem["buffers"] + mem["grads"] + mem["optimizer"]
    n = sum(p.numel() for p in model.parameters())
    assert mem["total"] == 16 * n  # fp32 weights + grads + two AdamW moments
    assert mem["quantized_weights"] == 0


def test_gpt2_param_counts():
    assert gpt2_param_count(12, 768, 50257, 1024)["total"] == 124_439_808  # GPT-2 small
    assert gpt2_param_count(24, 1024, 50257, 1024)["total"] == 354_823_168  # GPT-2 medium
    from minillm.model import GPT, GPTConfig

    config = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
    counts = gpt2_param_count(config.n_layer, config.n_embd, config.vocab_size, config.block_size)
    assert counts["total"] == GPT(config).num_parameters()
    linear = sum(m.weight.numel() for name, m in GPT(config).named_modules()
                 if isinstance(m, nn.Linear) and name != "lm_head")
    assert counts["linear"] == linear


def test_memory_table_rows():
    rows = {r["method"].split(" r=")[0]: r for r in memory_table(*MODEL_PRESETS["gpt2"])}
    N = 124_439_808
    assert rows["full FT fp32"]["total"] == 16 * N
    assert rows["full FT bf16 mixed"]["total"] == 16 * N  # 2 + 2 + (4 + 4 + 4)
    assert rows["full FT bf16 mixed"]["weights"] == 2 * N
    P = 12 * 8 * (768 + 3 * 768)  # r (in + out) for c_attn in 12 layers
    assert rows["LoRA"]["trainable"] == P and rows["LoRA"]["total"] == 2 * N + 16 * P
    qlora = [r for r in memory_table(*MODEL_PRESETS["gpt2"]) if r["method"].startswith("QLoRA")]
    assert qlora[1]["total"] < qlora[0]["total"] < rows["LoRA"]["total"]
    linear = gpt2_param_count(12, 768, 50257, 1024)["linear"]
    saved_bits = 8 * (qlora[0]["weights"] - qlora[1]["weights"]) / linear
    assert saved_bits == pytest.approx(0.5 - 8 / 64 - 32 / (64 * 256), abs=1e-3)  # ~0.373 bits/param


def test_7b_shaped_full_finetuning_does_not_fit_16gb_but_qlora_does():
    rows = memory_table(*MODEL_PRESETS["7b-shaped"])
    by_method = {r["method"]: r for r in rows}
    assert not by_method["full FT fp32"]["fits"] and not by_method["full FT bf16 mixed"]["fits"]
    assert by_method["full FT fp32"]["total"] > 6 * 16 * GiB
    assert all(r["fits"] for r in rows if r["method"].startswith(("LoRA", "QLoRA")))
    assert memory_table(*MODEL_PRESETS["gpt2"])[0]["fits"]


def test_lora_targets_follow_peft_matching():
    all_targets = memory_table(12, 12, 768, 50257, 1024, lora_r=4, lora_targets=("c_attn", "c_proj", "c_fc"))
    assert all_targets[2]["trainable"] == 12 * 4 * ((768 + 2304) + (768 + 768) + (768 + 3072) + (3072 + 768))
    attn_only = memory_table(12, 12, 768, 50257, 1024, lora_r=4, lora_targets=("attn.c_proj",))
    assert attn_only[2]["trainable"] == 12 * 4 * (768 + 768)


def test_format_memory_table():
    rows = memory_table(*MODEL_PRESETS["7b-shaped"])
    text = format_memory_table(rows)
    lines = text.splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[0].startswith("| method |") and "fits 16 GiB" in lines[0]
    assert "| full FT fp32 |" in lines[2] and lines[2].endswith("| no |")
    assert lines[-1].endswith("| yes |")
    assert f"{rows[0]['total'] / GiB:.2f}" in lines[2]


def test_bad_input():
    with pytest.raises(TypeError, match="nn.Module"):
        param_bytes([1, 2])
    with pytest.raises(TypeError, match="Optimizer"):
        optimizer_state_bytes("adamw")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        optimizer_state_bytes(small_model(), "lion")
    with pytest.raises(ValueError, match="lora_targets"):
        memory_table(2, 2, 8, 10, 16, lora_targets=("q_proj",))
    with pytest.raises(ValueError, match="divisible"):
        memory_table(2, 3, 8, 10, 16)
    with pytest.raises(ValueError, match="n_layer"):
        memory_table(0, 2, 8, 10, 16)
    with pytest.raises(ValueError, match="no rows"):
        format_memory_table([])
    model = small_model()
    with pytest.raises(ValueError, match="cannot predict"):
        optimizer_state_bytes(torch.optim.RMSprop(model.parameters()))


def test_command_line_prints_every_preset(capsys):
    from minillm.cli import main

    for name in MODEL_PRESETS:
        assert main(["memory", "--preset", name, "--lora-r", "4", "--gpu-gib", "24"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{name}: ") and "fits 24 GiB" in out and "LoRA r=4" in out
