"""Memory accounting for fine-tuning: exact bytes from tensors, and an analytic table by method.

Training memory without activations is

    M = weights + gradients + optimizer state
      = sum_p bytes(p) + sum_{p trainable} bytes(p) + k * 4 bytes * (#trainable)      (AdamW: k = 2)

AdamW keeps two fp32 moments (m, v) per trainable parameter (Loshchilov & Hutter, 2019). Mixed
precision (ZeRO, Rajbhandari et al., 2020) stores bf16 weights and gradients plus an fp32 master
copy and the two fp32 moments: 2 + 2 + 4 + 4 + 4 = 16 bytes per parameter, the same as plain fp32
(4 + 4 + 8); mixed precision saves activation memory and time, not weight memory. LoRA trains
r (in + out) parameters per adapted matrix and freezes the rest (16 bytes per trainable parameter,
2 per frozen bf16 one); QLoRA (Dettmers et al., 2023) stores the frozen linear weights in NF4:
4 + 32/64 = 4.5 bits per parameter, or 4 + 8/64 + 32/(64*256) ~= 4.127 with double quantisation.
Activations are not counted: they scale with batch x sequence length and with checkpointing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

from minillm.peft.qlora import quantized_layers

__all__ = [
    "MODEL_PRESETS",
    "param_bytes",
    "buffer_bytes",
    "grad_bytes",
    "optimizer_state_bytes",
    "quantized_weight_bytes",
    "training_memory",
    "nf4_bytes",
    "gpt2_linear_shapes",
    "gpt2_param_count",
    "memory_table",
    "format_memory_table",
]

GiB = 2**30

# Optimizer states per trainable parameter, each fp32.
_STATES_PER_PARAM = {"adamw": 2, "adam": 2, "sgd_momentum": 1, "sgd": 0}

# (n_layer, n_head, n_embd, vocab_size, block_size)
MODEL_PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "gpt2": (12, 12, 768, 50257, 1024),
    "gpt2-medium": (24, 16, 1024, 50257, 1024),
    "gpt2-large": (36, 20, 1280, 50257, 1024),
    "gpt2-xl": (48, 25, 1600, 50257, 1024),
    "7b-shaped": (32, 32, 4096, 32000, 4096),  # LLaMA-7B's width/depth/vocab with GPT-2 blocks: 6.6B params
}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _check_module(model: object, who: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: model must be an nn.Module, got {type(model).__name__}")


# ---------------------------------------------------------------------------------------------------
# exact bytes of a live model


def param_bytes(model: nn.Module, trainable_only: bool = False) -> int:
    """Bytes of the model's parameters (a tied weight counted once)."""
    _check_module(model, "param_bytes")
    return sum(_nbytes(p) for p in model.parameters() if p.requires_grad or not trainable_only)


def buffer_bytes(model: nn.Module) -> int:
    """Bytes of the model's buffers (for a quantized model: packed 4-bit weights, scales, code tables)."""
    _check_module(model, "buffer_bytes")
    return sum(_nbytes(b) for b in model.buffers())


def grad_bytes(model: nn.Module) -> int:
    """Bytes the gradients take: one tensor like each trainable parameter (the .grad backward creates)."""
    _check_module(model, "grad_bytes")
    return sum(_nbytes(p) for p in model.parameters() if p.requires_grad)


def _predicted_state_bytes(params: Iterable[torch.Tensor], optimizer: str) -> int:
    if optimizer not in _STATES_PER_PARAM:
        raise ValueError(f"optimizer must be one of {sorted(_STATES_PER_PARAM)}, got {optimizer!r}")
    return _STATES_PER_PARAM[optimizer] * 4 * sum(p.numel() for p in params if p.requires_grad)


def optimizer_state_bytes(model_or_optimizer: nn.Module | torch.optim.Optimizer, optimizer: str = "adamw") -> int:
    """Optimizer state bytes.

    For a model: k fp32 states per trainable parameter (k = 2 for "adamw"/"adam", 1 "sgd_momentum", 0 "sgd").
    For a torch optimizer: the bytes of the tensors in its state (moments and step counters) once it has
    stepped; before its first step, the same prediction for its trainable parameters and its kind.
    """
    if isinstance(model_or_optimizer, nn.Module):
        return _predicted_state_bytes(model_or_optimizer.parameters(), optimizer)
    if not isinstance(model_or_optimizer, torch.optim.Optimizer):
        raise TypeError(
            "optimizer_state_bytes: expected an nn.Module or torch.optim.Optimizer, "
            f"got {type(model_or_optimizer).__name__}"
        )
    opt = model_or_optimizer
    if opt.state:
        return sum(_nbytes(v) for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor))
    params = [p for group in opt.param_groups for p in group["params"]]
    if isinstance(opt, (torch.optim.AdamW, torch.optim.Adam)):
        kind = "adam"
    elif isinstance(opt, torch.optim.SGD):
        kind = "sgd_momentum" if any(g.get("momentum", 0) for g in opt.param_groups) else "sgd"
    else:
        raise ValueError(
            f"optimizer_state_bytes: cannot predict the state of {type(opt).__name__} before its first step"
        )
    return _predicted_state_bytes(params, kind)


def quantized_weight_bytes(model: nn.Module) -> int:
    """Bytes of all 4-bit weights (packed codes + absmax or its double-quantised form; no code tables)."""
    _check_module(model, "quantized_weight_bytes")
    return sum(layer.nbytes for _, layer in quantized_layers(model))


def training_memory(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of params, buffers, grads and optimizer state (AdamW prediction when no optimizer is given).

    total = params + buffers + grads + optimizer; activations are not included.
    """
    _check_module(model, "training_memory")
    out = {
        "params": param_bytes(model),
        "trainable_params": param_bytes(model, trainable_only=True),
        "buffers": buffer_bytes(model),
        "quantized_weights": quantized_weight_bytes(model),
        "grads": grad_bytes(model),
        "optimizer": optimizer_state_bytes(model if optimizer is None else optimizer),
    }
    out["total"] = out["params"] + out["buffers"] + out["grads"] + out["optimizer"]
    return out


# ---------------------------------------------------------------------------------------------------
# analytic table for GPT-2-shaped models


def nf4_bytes(numel: int, blocksize: int = 64, double_quant: bool = True, dq_blocksize: int = 256) -> int:
    """Bytes of a 4-bit weight of `numel` values, as `quantize_4bit` stores it.

    ceil(n/2) packed bytes + per block either one fp32 absmax, or one uint8 code plus one fp32 scale per
    dq_blocksize blocks and one fp32 offset.
    """
    n_blocks = -(-numel // blocksize)
    if not double_quant:
        return -(-numel // 2) + 4 * n_blocks
    return -(-numel // 2) + n_blocks + 4 * -(-n_blocks // dq_blocksize) + 4


def gpt2_linear_shapes(n_embd: int) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer of a GPT-2 block, by name."""
    C = n_embd
    return {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_fc": (C, 4 * C), "mlp.c_proj": (4 * C, C)}


def gpt2_param_count(n_layer: int, n_embd: int, vocab_size: int, block_size: int) -> dict[str, int]:
    """Parameter counts of a GPT-2 (biases on, lm_head tied to wte): linear weights vs everything else.

    Per block 12 C^2 weights in the linears plus 13 C biases/LayerNorm values; wte V C, wpe T C, ln_f 2 C.
    """
    linear = n_layer * sum(i * o for i, o in gpt2_linear_shapes(n_embd).values())
    other = vocab_size * n_embd + block_size * n_embd + n_layer * 13 * n_embd + 2 * n_embd
    return {"linear": linear, "other": other, "total": linear + other}


def _lora_params(n_layer: int, n_embd: int, r: int, targets: Sequence[str]) -> int:
    """r (in + out) per targeted matrix; targets match like PEFT (name or '.'-suffix, e.g. 'c_proj')."""
    shapes = gpt2_linear_shapes(n_embd)
    hit = [name for name in shapes if any(name == t or name.endswith("." + t) for t in targets)]
    if not hit:
        raise ValueError(f"lora_targets {list(targets)} match none of {list(shapes)}")
    return n_layer * sum(r * (shapes[name][0] + shapes[name][1]) for name in hit)


def memory_table(
    n_layer: int,
    n_head: int,
    n_embd: int,
    vocab_size: int,
    block_size: int,
    lora_r: int = 8,
    lora_targets: Sequence[str] = ("c_attn",),
    gpu_gib: float = 16.0,
) -> list[dict[str, object]]:
    """Weights / grads / AdamW-state bytes of full fine-tuning, LoRA and QLoRA for a GPT-2-shaped model.

    Rows (bytes per parameter):
      full FT fp32         weights 4, grads 4, AdamW 8                         (16 / param)
      full FT bf16 mixed   bf16 weights 2, grads 2; optimizer = fp32 master 4 + AdamW 8   (16 / param, ZeRO)
      LoRA                 frozen bf16 base 2; adapters 2 + 2 + 12 = 16 / trainable param
      QLoRA                NF4 linear weights (4.5 bits), the rest bf16; adapters as LoRA
      QLoRA + DQ           NF4 with double-quantised absmax (~4.127 bits)
    `fits` says whether weights + grads + optimizer state fit in `gpu_gib` GiB (activations excluded).
    """
    for name, value in (("n_layer", n_layer), ("n_head", n_head), ("n_embd", n_embd), ("vocab_size", vocab_size),
                        ("block_size", block_size), ("lora_r", lora_r)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"memory_table: {name} must be a positive integer, got {value!r}")
    if n_embd % n_head:
        raise ValueError(f"memory_table: n_embd ({n_embd}) must be divisible by n_head ({n_head})")
    if isinstance(lora_targets, str):
        lora_targets = (lora_targets,)
    counts = gpt2_param_count(n_layer, n_embd, vocab_size, block_size)
    N = counts["total"]
    P = _lora_params(n_layer, n_embd, lora_r, lora_targets)
    shapes = gpt2_linear_shapes(n_embd).values()

    def nf4(double_quant: bool) -> int:
        return n_layer * sum(nf4_bytes(i * o, double_quant=double_quant) for i, o in shapes)

    rows = [
        ("full FT fp32", N, 4 * N, 4 * N, 8 * N),
        # bf16 rows: the fp32 master copy counts as optimizer state (ZeRO's K = 12 bytes per parameter)
        ("full FT bf16 mixed", N, 2 * N, 2 * N, 12 * N),
        (f"LoRA r={lora_r} (bf16 base)", P, 2 * N + 2 * P, 2 * P, 12 * P),
        # linear weights in NF4; embeddings, LayerNorms and biases in bf16
        (f"QLoRA r={lora_r} (NF4)", P, nf4(False) + 2 * counts["other"] + 2 * P, 2 * P, 12 * P),
        (f"QLoRA r={lora_r} (NF4+DQ)", P, nf4(True) + 2 * counts["other"] + 2 * P, 2 * P, 12 * P),
    ]
    table = []
    for method, trainable, weights, grads, optim in rows:
        total = weights + grads + optim
        table.append({
            "method": method, "params": N, "trainable": trainable, "weights": weights, "grads": grads,
            "optimizer": optim, "total": total, "fits": total <= gpu_gib * GiB, "gpu_gib": gpu_gib,
        })
    return table


def format_memory_table(rows: Sequence[dict[str, object]]) -> str:
    """Markdown table of `memory_table` rows, sizes in GiB."""
    if not rows:
        raise ValueError("format_memory_table: no rows")
    gpu = rows[0]["gpu_gib"]
    lines = [
        f"| method | trainable params | weights GiB | grads GiB | optimizer GiB | total GiB | fits {gpu:g} GiB |",
        "|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['trainable']:,} | {row['weights'] / GiB:.2f} | {row['grads'] / GiB:.2f} | "
            f"{row['optimizer'] / GiB:.2f} | {row['total'] / GiB:.2f} | {'yes' if row['fits'] else 'no'} |"
        )
    return "\n".join(lines)
