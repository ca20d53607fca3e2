"""QLoRA vs LoRA vs full fine-tuning on the world SFT data, and how much NF4 loses against FP4 and int4.

QLoRA (Dettmers et al., 2023) claims that training LoRA adapters through a frozen 4-bit NF4 base matches
16-bit LoRA (and full fine-tuning) while the frozen weights take ~4.127 instead of 16 bits per parameter.
This module measures both halves of the claim on our own models:

1. Fine-tuning (`compare_qlora`): the same base run, the same SFT data and steps, three methods

       full    theta <- AdamW(theta, grad)                                 every parameter trains
       lora    y = W x + b + s B A x                                       W frozen in fp32
       qlora   y = dequant(W_nf4) x + b + s B A x                          W frozen in NF4 + double quant

   LoRA and QLoRA use the same targets (every linear layer: c_attn, c_proj, c_fc, as the QLoRA repo does),
   rank, lora_alpha and learning rate, so the 4-bit base is the only difference. Reported per method:
   held-out exact match (`evaluate_instructions` on sft_test.jsonl), training time, and the measured bytes
   of weights + buffers + gradients + AdamW state (`minillm.memory.training_memory`, activations excluded).
   `loftq` (QLoRA with LoftQ initialisation, Li et al., 2023) can be added with --methods.

2. Quantisation error (`quantization_error_table`): quantise -> dequantise each weight and report the
   relative error  rel_mse = mean((w - deq(quant(w)))^2) / mean(w^2)  for NF4, NF4 + double quantisation,
   FP4 (E2M1) and the int4 absmax baseline, on Gaussian weights and on every linear weight of the base run
   (the layers QLoRA quantises), with the weights' excess kurtosis E[(w - mu)^4] / sigma^4 - 3 (0 for a
   Gaussian; large values mean outliers, which stretch a block's absmax and waste codes).

A 4-bit base cannot absorb the float update B A: `merge_peft` refuses it. `dequantize_model` turns every
Linear4bit back into an nn.Linear holding deq(W_nf4), after which the adapters merge (W' = deq(W) + s B A).

    python -m minillm.stages.qlora_compare --init runs/pipeline/base --out runs/qlora_compare
"""
from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from minillm.config import TrainConfig
from minillm.eval.task import evaluate_instructions
from minillm.memory import MODEL_PRESETS, format_memory_table, gpt2_param_count, memory_table, training_memory
from minillm.peft.apply import QLORA_SKIP, QLORA_TARGETS, count_parameters, replace_module
from minillm.peft.qlora import quantized_layers
from minillm.peft.tokens import chat_token_ids
from minillm.quant.nf4 import quantization_error
from minillm.runs import load_run

# Adapters take a larger step than full fine-tuning: the same multiple of the preset's SFT learning rate
# as `minillm peft-compare` (measured there by a sweep, lesson 7).
from minillm.stages import compare
from minillm.stages.compare import PEFT_LR_MULTIPLIER
from minillm.stages.sft import run_sft
from minillm.utils import atomic_write_text, write_json

__all__ = [
    "METHOD_SPECS", "PEFT_LR_MULTIPLIER", "QUANT_COLUMNS", "method_spec", "parse_methods", "dequantize_model",
    "linear_weights", "gaussian_weights", "excess_kurtosis", "error_row", "quantization_error_table",
    "compare_qlora", "render_report", "add_qlora_compare_arguments", "add_qlora_compare_command",
    "cmd_qlora_compare", "pipeline_qlora", "main",
]

# One spec per method; None is full fine-tuning. LoRA and QLoRA share targets, rank and alpha.
LORA_R, LORA_ALPHA = 8, 16
METHOD_SPECS: dict[str, dict[str, Any] | None] = {
    "full": None,
    "lora": {"method": "lora", "target_modules": QLORA_TARGETS, "r": LORA_R, "lora_alpha": LORA_ALPHA},
    "qlora": {"method": "qlora", "r": LORA_R, "lora_alpha": LORA_ALPHA},
    "loftq": {"method": "qlora", "r": LORA_R, "lora_alpha": LORA_ALPHA, "loftq_iters": 1},
}
DEFAULT_METHODS = ("full", "lora", "qlora")

# Columns of the error table: name -> (quant_type, double_quant) for `quantization_error`.
QUANT_COLUMNS: dict[str, tuple[str, bool]] = {
    "nf4": ("nf4", False), "nf4+dq": ("nf4", True), "fp4": ("fp4", False), "int4": ("int4", False),
}


def method_spec(method: str, r: int = LORA_R, lora_alpha: float = LORA_ALPHA,
                token_ids: Sequence[int] | None = None) -> dict[str, Any] | None:
    """A fresh PEFT spec for `method` (None: full fine-tuning) with rank r, lora_alpha and, if given,
    the chat template's token rows trained too (`trainable_token_indices`)."""
    base = METHOD_SPECS[method]
    if base is None:
        return None
    spec = {**copy.deepcopy(base), "r": r, "lora_alpha": lora_alpha}
    if token_ids:
        spec["trainable_token_indices"] = list(token_ids)
    return spec


def parse_methods(text: str | Sequence[str] | None) -> list[str]:
    """'full,lora,qlora' or a list -> validated method names in the given order (None: the default three)."""
    return compare.parse_methods(text, METHOD_SPECS, DEFAULT_METHODS)


# ---------------------------------------------------------------------- merging a 4-bit model
def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every Linear4bit by a frozen nn.Linear holding deq(W_nf4) (and the bias), in place.

    The model computes exactly what it computed before (Linear4bit is F.linear with deq(W_nf4)), but a LoRA
    layer around it can now merge: merge_peft(dequantize_model(model)) gives a plain GPT with
    W' = deq(W_nf4) + s B A, at full-precision size.
    """
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("dequantize_model: the model has no Linear4bit layer (nothing is quantized)")
    for name, q in layers:
        linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=q.weight.device,
                           dtype=q.weight_dtype)
        with torch.no_grad():
            linear.weight.copy_(q.dequantize())
            if q.bias is not None:
                linear.bias.copy_(q.bias)
        linear.requires_grad_(False)
        replace_module(model, name, linear)
    return model


# ---------------------------------------------------------------------- quantisation error
def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weight of every nn.Linear QLoRA quantises (all but lm_head/wte/wpe), by module name."""
    weights = {name: m.weight.detach() for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name and not any(p in QLORA_SKIP for p in name.split("."))}
    if not weights:
        raise ValueError("linear_weights: the model has no quantizable nn.Linear layer")
    return weights


def gaussian_weights(numel: int = 2**20, seed: int = 0) -> torch.Tensor:
    """numel draws of N(0, 1) as a (numel / 1024, 1024) matrix: the weights NF4 is designed for."""
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 1024 or numel % 1024:
        raise ValueError(f"gaussian_weights: numel must be a positive multiple of 1024, got {numel!r}")
    return torch.randn(numel // 1024, 1024, generator=torch.Generator().manual_seed(seed))


def excess_kurtosis(w: torch.Tensor) -> float:
    """E[(w - mu)^4] / sigma^4 - 3: 0 for a Gaussian, large when a few weights are outliers."""
    x = w.detach().double().flatten()
    z = (x - x.mean()) / x.std(correction=0)
    return float(z.pow(4).mean() - 3.0)


def error_row(name: str, weights: Sequence[torch.Tensor], blocksize: int = 64) -> dict[str, Any]:
    """Relative error of each 4-bit type on `weights` taken together:

        rel_mse[type] = sum_W sum_i (w_i - deq(quant(w))_i)^2 / sum_W sum_i w_i^2

    (each matrix quantised on its own, blocks of `blocksize`), plus the largest absolute error and the
    excess kurtosis of all the values.
    """
    if not weights:
        raise ValueError(f"error_row({name!r}): no weights")
    numel = sum(w.numel() for w in weights)
    energy = sum(float(w.double().square().sum()) for w in weights)
    row: dict[str, Any] = {"name": name, "numel": numel,
                           "kurtosis": excess_kurtosis(torch.cat([w.detach().flatten() for w in weights]))}
    for column, (quant_type, double_quant) in QUANT_COLUMNS.items():
        errors = [quantization_error(w, quant_type, blocksize, double_quant) for w in weights]
        row[column] = sum(e["mse"] * w.numel() for e, w in zip(errors, weights)) / energy
        row[column + "_max_abs"] = max(e["max_abs"] for e in errors)
    return row


def quantization_error_table(model: nn.Module | None = None, blocksize: int = 64, gaussian_numel: int = 2**20,
                             seed: int = 0) -> list[dict[str, Any]]:
    """Rows: Gaussian weights, then (if a model is given) all its linear weights and each kind of linear
    layer (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj across the blocks)."""
    rows = [error_row("Gaussian N(0, 1)", [gaussian_weights(gaussian_numel, seed)], blocksize)]
    if model is not None:
        weights = linear_weights(model)
        rows.append(error_row("trained model: every linear weight", list(weights.values()), blocksize))
        kinds: dict[str, list[torch.Tensor]] = {}
        for name, w in weights.items():
            kinds.setdefault(".".join(name.split(".")[-2:]), []).append(w)  # h.3.attn.c_attn -> attn.c_attn
        rows += [error_row(f"trained model: {kind}", ws, blocksize) for kind, ws in kinds.items()]
    return rows


def render_error_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: relative MSE (x 1e-3) per 4-bit type, and NF4's error as a fraction of int4's."""
    lines = ["| weights | values | excess kurtosis | NF4 | NF4 + DQ | FP4 | int4 | NF4 / int4 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['numel']:,} | {r['kurtosis']:.2f} | {1e3 * r['nf4']:.3f} | "
                     f"{1e3 * r['nf4+dq']:.3f} | {1e3 * r['fp4']:.3f} | {1e3 * r['int4']:.3f} | "
                     f"{r['nf4'] / r['int4']:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- the fine-tuning comparison
load_test_records = compare.load_records


def method_train_config(method: str, full_cfg: TrainConfig, peft_lr: float | None) -> TrainConfig:
    """Full fine-tuning uses `full_cfg`; the adapters the same with a higher lr (see peft-compare)."""
    return compare.method_train_config(method, full_cfg, peft_lr, METHOD_SPECS)


_run_optimizer = compare._optimizer_of_run


def run_method(method: str, spec: dict[str, Any] | None, init: str | os.PathLike, data: str | os.PathLike,
               records: list[dict[str, Any]], tokenizer: Any, out: Path, cfg: TrainConfig,
               progress: bool = True) -> dict[str, Any]:
    """Fine-tune `init` with one method, then measure it; returns its table row."""

    run = run_sft(init, data, out / method, cfg, peft=spec, progress=progress)
    model, result = run.model, run.result
    memory = training_memory(model, _run_optimizer(model, cfg, out / method / "ckpt.pt"))
    scores = evaluate_instructions(model, tokenizer, records)
    trainable, total = count_parameters(model)
    row = {
        "method": method, "spec": spec, "lr": cfg.lr, "steps": result.step, "trainable": trainable,
        "total": total, "train_seconds": result.seconds, "seconds_per_step": result.seconds / max(result.step, 1),
        "train_loss": result.train_loss, "val_loss": result.val_loss, "memory": memory,
        "exact_match": scores["exact_match"], "refusal_accuracy": scores["refusal_accuracy"],
        "gold_reward": scores["gold_reward"],
    }
    print(f"[qlora-compare] {method}: exact match {row['exact_match']:.3f}, {result.seconds:.1f}s, "
          f"{memory['total'] / 2**20:.2f} MB params+buffers+grads+AdamW")
    return row


def compare_qlora(
    init: str | os.PathLike,
    data: str | os.PathLike,
    test_data: str | os.PathLike,
    out: str | os.PathLike,
    full_cfg: TrainConfig,
    methods: Sequence[str] = DEFAULT_METHODS,
    peft_lr: float | None = None,
    r: int = LORA_R,
    lora_alpha: float = LORA_ALPHA,
    chat_tokens: bool = True,
    gaussian_numel: int = 2**20,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune the base run `init` with each method, tabulate quantisation errors of its weights, and
    write table.md and results.json to `out` (each run in out/<method>). Returns the summary.

    chat_tokens: the adapter methods also train the chat template tokens' embedding rows, which
    pretraining never saw (as `minillm peft-compare` does); full fine-tuning trains them anyway.
    """

    methods = parse_methods(methods)
    out = Path(out)
    records = load_test_records(test_data)
    base, tok, base_cfg = load_run(init)
    token_ids = None
    if chat_tokens:

        token_ids = chat_token_ids(tok)
    errors = quantization_error_table(base, gaussian_numel=gaussian_numel)
    rows = [run_method(m, method_spec(m, r, lora_alpha, token_ids), init, data, records, tok, out,
                       method_train_config(m, full_cfg, peft_lr), progress) for m in methods]
    summary = {"init": str(init), "model": base_cfg["model"], "parameters": count_parameters(base)[1],
               "steps": full_cfg.max_steps, "full_lr": full_cfg.lr, "test_data": str(test_data),
               "chat_tokens": token_ids, "r": r, "lora_alpha": lora_alpha, "rows": rows, "errors": errors}
    write_json(out / "results.json", summary)
    atomic_write_text(out / "table.md", render_report(summary))
    return summary


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f}"


def _loss(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def render_method_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per fine-tuning method, exact match in points against LoRA."""
    lora = next((r["exact_match"] for r in rows if r["method"] == "lora"), None)
    lines = ["| method | trainable | frozen 4-bit (MB) | weights + buffers (MB) | grads (MB) | AdamW (MB) | "
             "total (MB) | train time (s) | s / step | val loss | exact match | vs LoRA (points) | refusal acc. | "
             "gold reward |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        m = r["memory"]
        delta = "-" if lora is None or r["method"] == "lora" else f"{100 * (r['exact_match'] - lora):+.1f}"
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {_mb(m['quantized_weights'])} | "
            f"{_mb(m['params'] + m['buffers'])} | {_mb(m['grads'])} | {_mb(m['optimizer'])} | {_mb(m['total'])} | "
            f"{r['train_seconds']:.1f} | {r['seconds_per_step']:.3f} | {_loss(r['val_loss'])} | "
            f"{r['exact_match']:.3f} | {delta} | {r['refusal_accuracy']:.3f} | {r['gold_reward']:.3f} |")
    return "\n".join(lines)


def render_analytic_memory(r: int = LORA_R, shapes: Sequence[str] = ("gpt2", "gpt2-xl", "7b-shaped")) -> str:
    """`minillm.memory.memory_table` for larger GPT-2-shaped models, LoRA/QLoRA on every linear layer."""
    text = []
    for name in shapes:
        shape = MODEL_PRESETS[name]
        n = gpt2_param_count(shape[0], shape[2], shape[3], shape[4])["total"]
        text += [f"**{name}** ({n / 1e6:,.0f}M parameters)", "",
                 format_memory_table(memory_table(*shape, lora_r=r, lora_targets=QLORA_TARGETS)), ""]
    return "\n".join(text)


def render_report(summary: dict[str, Any]) -> str:
    """table.md: the fine-tuning table, the verdict against LoRA, the error table, the analytic memory."""
    rows, m = summary["rows"], summary["model"]
    by = {r["method"]: r for r in rows}
    text = [
        "# QLoRA vs LoRA vs full fine-tuning", "",
        f"Base run `{summary['init']}`: {m['n_layer']} layers, {m['n_embd']} wide, {summary['parameters']:,} "
        f"parameters. {summary['steps']} SFT steps per method; learning rate {summary['full_lr']:g} for full "
        "fine-tuning, " + ", ".join(sorted({f"{r['lr']:g}" for r in rows if r["spec"] is not None}))
        + f" for the adapters. LoRA and QLoRA: r = {summary['r']}, lora_alpha = {summary['lora_alpha']:g}, "
        f"on every linear layer ({', '.join(QLORA_TARGETS)})"
        + (f", plus the chat tokens' embedding rows {summary['chat_tokens']}." if summary.get("chat_tokens")
           else "."),
        f"Exact match: greedy answers to `{summary['test_data']}`. Bytes: measured from the tensors of the "
        "trained model and its AdamW state (fp32 unless 4-bit; activations not counted).", "",
        render_method_table(rows), "",
    ]
    if "qlora" in by and "lora" in by:
        q, lo = by["qlora"], by["lora"]
        gap = 100 * (q["exact_match"] - lo["exact_match"])
        verdict = "within" if abs(gap) <= 5 else "NOT within"
        line = f"QLoRA - LoRA exact match: {gap:+.1f} points ({verdict} the 5-point target)"
        if lo["exact_match"] == 0:
            line += "; LoRA itself scores 0 here, so exact match cannot tell them apart: compare the val loss"
        if q["val_loss"] is not None and lo["val_loss"]:
            line += f". Validation loss QLoRA / LoRA = {q['val_loss'] / lo['val_loss']:.3f}"
        text += [line + ".", ""]
    text += ["## Quantisation error: relative MSE x 1e-3 = 1000 * sum (w - deq(quant(w)))^2 / sum w^2", "",
             "Blocks of 64, one absmax each; DQ = double quantisation of the absmax values (bitsandbytes).", "",
             render_error_table(summary["errors"]), "",
             f"## Memory at larger shapes (analytic: `python -m minillm memory --preset gpt2-xl`, "
             f"here LoRA on every linear layer, r = {summary['r']}, 16 GiB GPU)", "",
             render_analytic_memory(summary["r"])]
    return "\n".join(text)


# ---------------------------------------------------------------------- command line and pipeline
