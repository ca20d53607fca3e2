"""The compression stage (`python -m minillm compress`, lesson 10): every method's cost and effect in one table.

Three experiments on the pipeline's models, then one table:

    pruning   on the base model: validation perplexity and fact completion against sparsity 10%..90% for
              magnitude, Wanda and structured (heads + neurons) pruning, 2:4 and L0 gates at 50%, and each at
              50% after a short recovery fine-tune (the masks kept);
    PTQ       on the base model: int8 absmax (per tensor, per row), LLM.int8() (vector-wise + outliers), NF4,
              round-to-nearest and GPTQ at 4 and 3 bits: bits per weight, per-layer reconstruction error,
              perplexity, fact completion; and the outlier demonstration (one input feature of a layer set to
              10..100 in every token: per-tensor and vector-wise int8 lose the other features, LLM.int8() does not);
    combined  on the chat (SFT) model: each method applied to it, next to a distilled student: parameters,
              bytes, forward latency, held-out answer loss, fact completion, exact match and gold reward.

The math lives in `minillm.quant.{prune,int8,gptq,nf4}` and `minillm.align.distill`; this file wires it to the
runs, the data and the loop.
"""
from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from minillm.align.chat import encode_chats, load_chats, sample_batches
from minillm.align.sft import sft_loss
from minillm.config import DistillConfig, TrainConfig, get_preset
from minillm.datasets import random_windows, read_jsonl, tokenize_corpus
from minillm.eval.perplexity import perplexity
from minillm.eval.task import fact_completion_accuracy
from minillm.model import GPT
from minillm.plots import plot_pruning
from minillm.quant.gptq import gptq_quantize_model, layer_reconstruction_error, rtn_quantize
from minillm.quant.int8 import (Int8Linear, inject_outlier, int8_roundtrip, llm_int8_matmul, outlier_columns,
                                quantize_model_int8)
from minillm.quant.nf4 import dequantize_4bit, quantize_4bit
from minillm.quant.prune import apply_masks, block_linears, l0_prune, prune_model, prune_structured
from minillm.runs import load_plain_run
from minillm.stages.compare import forward_seconds
from minillm.stages.distill import PRETRAIN_KD, chat_model_row, distill_experiment, student_base
from minillm.stages.pretrain import lm_loss
from minillm.tokenizer import Tokenizer
from minillm.train import train
from minillm.utils import pick_device, write_json

SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
RECOVERY_SPARSITY = 0.5
L0_STEPS = 100  # gate-learning steps of the "l0" method (weights frozen; the recovery fine-tune trains them)


# ----------------------------------------------------------------------------- data and figures
def calibration_batches(ids: torch.Tensor, block: int, n_batches: int = 8, batch_size: int = 8,
                        seed: int = 0) -> list[torch.Tensor]:
    """Random windows of training text, (batch_size, block) each: GPTQ's and Wanda's calibration data."""
    gen = torch.Generator().manual_seed(seed)
    return [random_windows(ids, batch_size, block, gen)["input_ids"] for _ in range(n_batches)]


def lm_figures(model: nn.Module, tok: Tokenizer, val_ids: torch.Tensor, probes: list[dict[str, Any]]
               ) -> dict[str, float]:
    """Validation perplexity (non-overlapping windows of block_size) and greedy fact completion of a base model."""
    block = model.config.block_size
    ppl = perplexity(model, val_ids, max_length=block, stride=block, batch_size=16)["ppl"]
    return {"ppl": ppl, "fact_completion": fact_completion_accuracy(model, tok, probes)["accuracy"]}


def layer_inputs(model: GPT, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inputs (N, d_in) every block Linear sees on the calibration batches (of the model as it is)."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_pre_hook(lambda _m, a, n=name: seen.setdefault(n, []).append(
        a[0].detach().flatten(0, -2))) for name, m in block_linears(model).items()]
    try:
        with torch.no_grad():
            for idx in batches:
                model(idx)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}


def _params(model: nn.Module) -> int:
    """Distinct parameters (the tied embedding once), counting an Int8Linear's int8 weight and bias (buffers) too."""
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return n + sum(m.weight_q.numel() + (m.bias.numel() if m.bias is not None else 0)
                   for m in model.modules() if isinstance(m, Int8Linear))


def _weight(m: nn.Module) -> torch.Tensor:
    return m.dequantized_weight() if isinstance(m, Int8Linear) else m.weight


def _block_linears(model: nn.Module) -> list[nn.Module]:
    return [m for name, m in model.named_modules() if isinstance(m, (nn.Linear, Int8Linear)) and name.startswith("h.")]


def _block_weight_count(model: nn.Module) -> int:
    return sum(_weight(m).numel() for m in _block_linears(model))


def _nonzero_block_weights(model: nn.Module) -> int:
    return sum(int((_weight(m) != 0).sum()) for m in _block_linears(model))


# ----------------------------------------------------------------------------- pruning
def pruned_copy(model: GPT, method: str, sparsity: float, calibration: list[torch.Tensor]) -> tuple[GPT, dict]:
    """A pruned deep copy: "magnitude", "wanda", "2:4" (Wanda scores, N:M groups), "structured" (heads and MLP
    neurons removed by importance, each layer by the same fraction) or "l0" (hard-concrete gates on heads and
    neurons learned toward the target size, LLM-Shearing's Lagrangian, then removed). Returns the model and prune
    stats (masks if unstructured)."""
    pruned = copy.deepcopy(model).eval()
    if method == "l0":  # gates learned toward the target size on the calibration batches, then removal
        stats = l0_prune(pruned, lambda step: calibration[step % len(calibration)], 1.0 - sparsity, L0_STEPS)
        return pruned.eval(), {"masks": None, "stats": {k: v for k, v in stats.items()
                                                        if k not in ("head_gates", "neuron_gates", "history")}}
    if method == "structured":
        stats = prune_structured(pruned, sparsity, sparsity, calibration)
        return pruned, {"masks": None, "stats": stats}
    if method == "2:4":
        return pruned, prune_model(pruned, None, "wanda", nm=(2, 4), calibration=calibration)
    return pruned, prune_model(pruned, sparsity, method, calibration=calibration if method == "wanda" else None)


def removed_fraction(before: GPT, after: GPT) -> float:
    """Share of the block Linear weights that are gone: zeroed (unstructured) or removed (structured)."""
    total = sum(m.weight.numel() for m in block_linears(before).values())
    return 1.0 - _nonzero_block_weights(after) / total


def recover(model: GPT, masks: dict[str, torch.Tensor] | None, get_batch: Callable, loss_fn: Callable,
            train_cfg: TrainConfig, out: Path) -> GPT:
    """A short fine-tune of a pruned model; the masks' gradient hooks keep pruned weights at zero (weight_decay 0
    and a fresh AdamW: a weight whose gradient is always 0 never moves)."""
    handles = apply_masks(model, masks) if masks else []
    try:
        train(model, train_cfg, get_batch, loss_fn, out, desc="recover", has_val=False, progress=False)
    finally:
        for h in handles:
            h.remove()
    return model.eval()


def recovery_config(steps: int, device: str, lr: float) -> TrainConfig:
    return TrainConfig(max_steps=steps, batch_size=16, lr=lr, min_lr=lr / 10, warmup_steps=0, weight_decay=0.0,
                       eval_interval=0, eval_iters=1, log_interval=max(1, steps // 4), device=device)


def pruning_curve(base: GPT, tok: Tokenizer, val_ids: torch.Tensor, train_ids: torch.Tensor,
                  probes: list[dict[str, Any]], calibration: list[torch.Tensor], out: Path,
                  sparsities: tuple[float, ...] = SPARSITIES, recovery_steps: int = 100, device: str = "cpu"
                  ) -> list[dict[str, Any]]:
    """Rows {method, sparsity, removed, ppl, fact_completion, recovered}: the curve, plus each method at 50% after
    `recovery_steps` of continued pretraining with the masks kept (recovered=True)."""
    rows = [{"method": "dense", "sparsity": 0.0, "removed": 0.0, "recovered": False,
             **lm_figures(base, tok, val_ids, probes)}]
    for method in ("magnitude", "wanda", "structured"):
        for s in sparsities:
            pruned, _ = pruned_copy(base, method, s, calibration)
            rows.append({"method": method, "sparsity": s, "removed": removed_fraction(base, pruned),
                         "recovered": False, **lm_figures(pruned, tok, val_ids, probes)})
    block = base.config.block_size

    def get_batch(split: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
        return random_windows(train_ids, 16, block, gen)

    cfg = recovery_config(recovery_steps, device, lr=3e-4)
    for method in ("magnitude", "wanda", "2:4", "structured", "l0"):
        pruned, info = pruned_copy(base, method, RECOVERY_SPARSITY, calibration)
        removed = removed_fraction(base, pruned)
        if method in ("2:4", "l0"):  # one point each: before and after recovery
            rows.append({"method": method, "sparsity": 0.5, "removed": removed, "recovered": False,
                         **lm_figures(pruned, tok, val_ids, probes)})
        recover(pruned, info["masks"], get_batch, lm_loss, cfg, out / f"recover_{method.replace(':', '_')}")
        pruned.to(base.wte.weight.device)
        rows.append({"method": method, "sparsity": RECOVERY_SPARSITY, "removed": removed_fraction(base, pruned),
                     "recovered": True, **lm_figures(pruned, tok, val_ids, probes)})
        if abs(rows[-1]["removed"] - removed) > 1e-9:  # the masks' hooks failed: the comparison would be unfair
            raise RuntimeError(f"recovery of {method} revived pruned weights ({removed} -> {rows[-1]['removed']})")
    return rows


# ----------------------------------------------------------------------------- post-training quantization
def weight_only(model: GPT, quantize: Callable[[torch.Tensor], tuple[torch.Tensor, float]]) -> tuple[GPT, float]:
    """A copy with every block Linear's weight replaced by quantize(W) -> (W_hat, bits per weight); returns the
    model and the mean bits per weight."""
    out = copy.deepcopy(model).eval()
    bits, count = 0.0, 0
    with torch.no_grad():
        for m in block_linears(out).values():
            w_hat, b = quantize(m.weight)
            m.weight.copy_(w_hat)
            bits, count = bits + b * m.weight.numel(), count + m.weight.numel()
    return out, bits / count


def nf4_weight(w: torch.Tensor) -> tuple[torch.Tensor, float]:
    """NF4 with double quantisation, blocks of 64 (lesson 8): (dequantised W, stored bits per weight)."""
    state = quantize_4bit(w.detach(), blocksize=64, quant_type="nf4", double_quant=True)
    return dequantize_4bit(state).reshape(w.shape), state.bits_per_param


def int8_weight(granularity: str) -> Callable[[torch.Tensor], tuple[torch.Tensor, float]]:
    """int8 absmax round trip of W (per tensor or per row) and its bits: 8 + 32 per scale / weights per scale."""
    def quantize(w: torch.Tensor) -> tuple[torch.Tensor, float]:
        per_scale = w.numel() if granularity == "tensor" else w.shape[1]
        return int8_roundtrip(w.detach(), "absmax", granularity), 8 + 32 / per_scale
    return quantize


def rtn_weight(bits: int, group: int) -> Callable[[torch.Tensor], tuple[torch.Tensor, float]]:
    def quantize(w: torch.Tensor) -> tuple[torch.Tensor, float]:
        q = rtn_quantize(w.detach(), bits, group)
        return q.weight, q.bits_per_param
    return quantize


def mean_layer_error(reference: GPT, model: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    """Mean over block Linears of ||X W^T - X W_hat^T||^2 / ||X W^T||^2 on the fp32 model's calibration inputs."""
    ref, quant = block_linears(reference), dict(model.named_modules())
    errors = []
    for name, linear in ref.items():
        w_hat = _weight(quant[name])
        errors.append(float(layer_reconstruction_error(linear.weight.detach(), w_hat.detach(), inputs[name])))
    return sum(errors) / len(errors)


def gptq_group(model: GPT) -> int:
    """GPTQ's usual group of 128 input columns, or the largest divisor of n_embd that is at most 128."""
    return math.gcd(128, model.config.n_embd)


def ptq_table(base: GPT, tok: Tokenizer, val_ids: torch.Tensor, probes: list[dict[str, Any]],
              calibration: list[torch.Tensor]) -> list[dict[str, Any]]:
    """One row per method on the base model: bits per block weight, mean layer error, perplexity, facts."""
    inputs = layer_inputs(base, calibration)
    group = gptq_group(base)
    rows = []

    def add(name: str, model: nn.Module, bits: float) -> None:
        rows.append({"method": name, "bits_per_weight": bits, "layer_error": mean_layer_error(base, model, inputs),
                     **lm_figures(model, tok, val_ids, probes)})

    add("fp32", base, 32.0)
    for granularity in ("tensor", "row"):
        add(f"int8 absmax, per {granularity} (weights)", *weight_only(base, int8_weight(granularity)))
    int8 = quantize_model_int8(copy.deepcopy(base).eval(), threshold=6.0)
    add("LLM.int8() (weights and activations, outliers >= 6 in fp32)", int8,
        sum(m.nbytes * 8 for m in int8.modules() if isinstance(m, Int8Linear))
        / sum(m.in_features * m.out_features for m in int8.modules() if isinstance(m, Int8Linear)))
    add("NF4 + double quantisation (blocks of 64)", *weight_only(base, nf4_weight))
    for bits in (4, 3):
        rtn, rtn_bits = weight_only(base, rtn_weight(bits, group))
        add(f"round-to-nearest {bits}-bit, groups of {group}", rtn, rtn_bits)
        gptq = gptq_quantize_model(copy.deepcopy(base).eval(), calibration, bits=bits, group_size=group)
        add(f"GPTQ {bits}-bit, groups of {group}", gptq, rtn_bits)  # same storage as RTN: codes + group scale/zero
    return rows


def per_tensor_int8_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x W^T with x and W each quantised to int8 with one absmax for the whole tensor (the naive scheme)."""
    return int8_roundtrip(x, "absmax", "tensor") @ int8_roundtrip(w, "absmax", "tensor").T


def outlier_demo(base: GPT, calibration: list[torch.Tensor], layer: str = "h.0.attn.c_attn", feature: int = 0,
                 magnitudes: tuple[float, ...] = (0, 10, 30, 60, 100)) -> list[dict[str, Any]]:
    """Error of one layer's real product Y = X W^T when feature `feature` of X is set to +-magnitude in every token
    (`inject_outlier`; 0 = X as it is), for per-tensor int8, vector-wise int8 and LLM.int8(): ||Y_hat - Y|| over
    ||Y_rest||, the part of Y the other features contribute, so 1.0 means their information is as good as gone.
    Emergent outliers of large models reach magnitudes of 20-60 (Dettmers et al. 2022)."""
    x = layer_inputs(base, calibration[:2])[layer]  # (N, d_in) real activations of that layer
    w = block_linears(base)[layer].weight.detach()
    rows = []
    for magnitude in magnitudes:
        xm = inject_outlier(x, feature, magnitude) if magnitude else x
        y = xm @ w.T
        y_rest = y - xm[:, feature:feature + 1] * w[:, feature]  # (N, d_out) without the outlier feature's term

        def rel(y_hat: torch.Tensor, y: torch.Tensor = y, y_rest: torch.Tensor = y_rest) -> float:
            return float((y_hat - y).norm() / y_rest.norm())

        rows.append({"magnitude": magnitude, "per-tensor int8": rel(per_tensor_int8_matmul(xm, w)),
                     "vector-wise int8": rel(llm_int8_matmul(xm, w, threshold=None)),
                     "LLM.int8()": rel(llm_int8_matmul(xm, w, threshold=6.0)),
                     "outlier columns": len(outlier_columns(xm, 6.0))})
    return rows


# ----------------------------------------------------------------------------- the combined table (chat model)
def stored_bytes(model: nn.Module, block_bits: float | None = None) -> int:
    """Bytes of the weights: every parameter in fp32, except the block Linears' weights at `block_bits` (None:
    fp32). Pruned zeros are stored densely (a sparse format needs an index per kept weight)."""
    total = 4 * _params(model)
    if block_bits is not None:
        n = _block_weight_count(model)
        total += int(n * block_bits / 8) - 4 * n
    return total


def combined_table(sft_dir: str | os.PathLike, data: Path, test: list[dict[str, Any]], probes: list[dict[str, Any]],
                   calibration: list[torch.Tensor], students: list[tuple[str, nn.Module]], out: Path,
                   recovery_steps: int = 100, device: str = "cpu", timing_seconds: float = 4.0
                   ) -> list[dict[str, Any]]:
    """Each method applied to the chat model, plus the distilled students: cost and effect in one row each.
    timing_seconds: about how long the latency measurement may take (at least 10 rounds)."""
    dev = calibration[0].device
    sft, tok, _ = load_plain_run(sft_dir, device=dev)
    group = gptq_group(sft)
    chats = load_chats(data / "sft_train.jsonl")
    examples, _ = encode_chats(tok, chats, sft.config.block_size)
    get_batch = sample_batches(examples, 16, tok.pad_id)
    cfg = recovery_config(recovery_steps, device, lr=5e-4)  # the cpu preset's SFT learning rate
    # (name, model, bits per block weight (None: fp32)); quantised weights that round to 0 are not pruned ones
    variants: list[tuple[str, nn.Module, float | None]] = [("chat model (fp32)", sft, None)]
    for method in ("wanda", "structured"):
        pruned, info = pruned_copy(sft, method, RECOVERY_SPARSITY, calibration)
        recover(pruned, info["masks"], get_batch, sft_loss, cfg, out / f"recover_chat_{method}")
        variants.append((f"{method} 50% + {recovery_steps} recovery steps", pruned.to(dev), None))
    int8 = quantize_model_int8(copy.deepcopy(sft), threshold=6.0)
    variants.append(("LLM.int8()", int8, 8 + 32 / sft.config.n_embd))
    nf4, nf4_bits = weight_only(sft, nf4_weight)
    variants.append(("NF4 + DQ", nf4, nf4_bits))
    gptq = gptq_quantize_model(copy.deepcopy(sft).eval(), calibration, bits=4, group_size=group)
    variants.append((f"GPTQ 4-bit (g{group})", gptq, rtn_quantize(sft.h[0].mlp.c_fc.weight, 4, group).bits_per_param))
    for name, student in students:
        variants.append((name, student.to(dev), None))
    idx = calibration[0][:4]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared CPU, one thread's CPU time is steady (two: ratios of equal models 0.8-1.5)
    try:
        times = forward_seconds({name: m.eval() for name, m, _ in variants}, idx, repeats=10,
                                budget_seconds=timing_seconds)
    finally:
        torch.set_num_threads(threads)
    rows = []
    for name, model, bits in variants:
        row = chat_model_row(name, model, tok, test, probes)
        kept = _nonzero_block_weights(model) if bits is None else _block_weight_count(model)
        row.update({"parameters": _params(model), "block_weights_kept": kept,
                    "bytes": stored_bytes(model, bits), "latency": times[name] / times["chat model (fp32)"]})
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- the stage
def run_compress(base_dir: str | os.PathLike, sft_dir: str | os.PathLike, data: str | os.PathLike,
                 out: str | os.PathLike, student: str | os.PathLike | None = None, student_preset: str = "cpu-small",
                 distill_cfg: TrainConfig | None = None, distill_method: DistillConfig | None = None,
                 recovery_steps: int = 100, device: str = "auto", distill: bool = True,
                 sparsities: tuple[float, ...] = SPARSITIES, timing_seconds: float = 4.0) -> dict[str, Any]:
    """All three experiments; writes out/summary.json, out/report.md and out/pruning.png; returns the summary.

    student: a pretrained student run for distillation; None pretrains two of `student_preset`'s network on the
    teacher's corpus, one with cross-entropy (out/student_base) and one with word-level KD from the teacher's base
    model (out/student_base_kd). distill=False leaves the distillation rows out.
    """
    out, data = Path(out), Path(data)
    out.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    base, tok, _ = load_plain_run(base_dir, device=dev)
    val_ids = tokenize_corpus(data / "corpus_val.txt", tok)
    train_ids = tokenize_corpus(data / "corpus_train.txt", tok)
    probes = [r for _, r in read_jsonl(data / "probes.jsonl")]
    test = [r for _, r in read_jsonl(data / "sft_test.jsonl")]
    if train_ids.numel() < base.config.block_size + 1:
        raise ValueError(f"{data / 'corpus_train.txt'}: the calibration text has {train_ids.numel()} tokens, shorter "
                         f"than one block of block_size + 1 = {base.config.block_size + 1}")
    calibration = [b.to(dev) for b in calibration_batches(train_ids, base.config.block_size)]
    summary: dict[str, Any] = {"base": str(base_dir), "sft": str(sft_dir)}
    summary["pruning"] = pruning_curve(base, tok, val_ids, train_ids, probes, calibration, out, sparsities,
                                       recovery_steps=recovery_steps, device=device)
    plot_pruning(summary["pruning"], out / "pruning.png")
    summary["ptq"] = ptq_table(base, tok, val_ids, probes, calibration)
    summary["outliers"] = outlier_demo(base, calibration)
    students: list[tuple[str, nn.Module]] = []
    if distill:
        kd_student = None
        if student is None:  # two students of the same network: pretrained with CE, and with the teacher's help
            student, kd_student = out / "student_base", out / "student_base_kd"
            student_base(sft_dir, student_preset, student, progress=False)
            student_base(sft_dir, student_preset, kd_student, progress=False, kd=PRETRAIN_KD)
        train_cfg = distill_cfg or get_preset(student_preset).distill
        rows = distill_experiment(sft_dir, student, data / "sft_train.jsonl", test, probes, out / "distill",
                                  train_cfg, distill_method or get_preset(student_preset).distill_method,
                                  kd_student=kd_student)
        summary["distill"] = [{k: v for k, v in r.items() if k != "gold_rewards"} for r in rows]
        students.append(("student (SFT, no teacher)", load_plain_run(out / "distill" / "sft")[0]))
        students.append(("student (word-level KD in SFT)", load_plain_run(out / "distill" / "word")[0]))
        if kd_student is not None:
            students.append(("student (KD in pretraining, then SFT)",
                             load_plain_run(out / "distill" / "kd_pretrain_sft")[0]))
    summary["combined"] = combined_table(sft_dir, data, test, probes, calibration, students, out, recovery_steps,
                                         device, timing_seconds)
    for row in summary["combined"]:
        row.pop("gold_rewards", None)
    write_json(out / "summary.json", summary)
    (out / "report.md").write_text(render_report(summary))
    return summary


# ----------------------------------------------------------------------------- report
def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows])


def render_report(summary: dict[str, Any]) -> str:
    """Markdown: the combined table first, then the pruning curve, PTQ and outlier tables, and distillation."""
    parts = ["# Compression", "", "## Cost and effect on the chat model", "",
             _table(["model", "parameters", "block weights kept", "MB", "latency (x fp32)", "held-out answer loss",
                     "fact completion", "exact match", "gold reward"],
                    [[r["model"], r["parameters"], r["block_weights_kept"], r["bytes"] / 1e6, r["latency"],
                      r["val_loss"], r["fact_completion"], r["exact_match"], r["gold_reward"]]
                     for r in summary["combined"]]),
             "", "## Pruning the base model", "", "![pruning](pruning.png)", "",
             _table(["method", "sparsity", "removed", "recovered", "perplexity", "fact completion"],
                    [[r["method"], r["sparsity"], r["removed"], "yes" if r["recovered"] else "", r["ppl"],
                      r["fact_completion"]] for r in summary["pruning"]]),
             "", "## Post-training quantization of the base model", "",
             _table(["method", "bits / weight", "mean layer error", "perplexity", "fact completion"],
                    [[r["method"], r["bits_per_weight"], r["layer_error"], r["ppl"], r["fact_completion"]]
                     for r in summary["ptq"]]),
             "", "## Outliers: error of one layer's product X W^T (h.0.attn.c_attn, real inputs) when one input "
             "feature is set to +-magnitude in every token, relative to what the other features contribute", "",
             _table(["magnitude", "per-tensor int8", "vector-wise int8", "LLM.int8()", "outlier columns (>= 6)"],
                    [[r["magnitude"], r["per-tensor int8"], r["vector-wise int8"], r["LLM.int8()"],
                      r["outlier columns"]] for r in summary["outliers"]])]
    if "distill" in summary:
        parts += ["", "## Distillation (same student, same steps)", "",
                  _table(["model", "parameters", "held-out answer loss", "fact completion", "exact match",
                          "gold reward"],
                         [[r["model"], r["parameters"], r["val_loss"], r["fact_completion"], r["exact_match"],
                           r["gold_reward"]] for r in summary["distill"]])]
    return "\n".join(parts) + "\n"

