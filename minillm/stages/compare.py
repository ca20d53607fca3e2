"""Compare fine-tuning methods on one base model: what each trains, stores, costs and reaches.

Every method fine-tunes the same base run on the same SFT data with `minillm.stages.sft.run_sft`; the table
then reports, per method (full fine-tuning first):

    trainable share   = |phi| / (|theta_0| + |phi|)          (PEFT's print_trainable_parameters convention;
                                                              a tied weight is counted once)
    adapter bytes     = size of adapter.pt, the per-task file (full fine-tuning: the whole state dict)
    training bytes    = weights + buffers + gradients + AdamW state     (`minillm.memory.training_memory`)
                      = 4 |theta| + 4 |phi| + 8 |phi| (+ 4 per trained tensor: AdamW's step)   in fp32,
                        the moments read back from the run's checkpoint; activations are not counted
    exact match       = held-out instruction following (`evaluate_instructions` on sft_test.jsonl)
    slowdown          = t_forward(adapted) / t_forward(base), best of N, timed round-robin in the same run
                        (CPU time on the CPU, see `forward_seconds`), unmerged and, for LoRA/VeRA/KronA,
                        merged into the weights (W' = W + Delta W)

Parameter-efficient fine-tuning trades trainable parameters for quality (Houlsby et al., 2019; Hu et al.,
2021; He et al., 2022 compare them in one framework). Because PEFT methods train few parameters from a
fixed starting point, they want a larger learning rate than full fine-tuning: the default here is
`PEFT_LR_MULTIPLIER` times the preset's SFT learning rate (a sweep on the tiny and cpu presets, lesson 7).

Every PEFT method here also trains the embedding rows of the chat template's four tokens
(`trainable_token_indices`, `minillm.peft.tokens`): pretraining never saw them, and with frozen embeddings
no method learns to emit <|end|>. That adds 4 d trainable numbers to each method (`--no-chat-tokens`
shows the difference).

`analytic_parameter_table` gives the same parameter counts for any preset (e.g. GPT-2 small, the `gpu`
preset) without training: the model is built on PyTorch's `meta` device, which has shapes but no storage.
"""
from __future__ import annotations

import copy
import io
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from minillm.config import TrainConfig, get_preset
from minillm.datasets import read_jsonl
from minillm.eval.task import evaluate_instructions
from minillm.memory import training_memory
from minillm.model import GPT, GPTConfig
from minillm.peft.apply import ADAPTER_LAYERS, MERGEABLE_LAYERS, WRAPPERS, apply_peft, count_parameters, merge_peft
from minillm.peft.tokens import chat_token_ids
from minillm.plots import save_figure
from minillm.runs import load_run
from minillm.stages.sft import run_sft
from minillm.train import configure_optimizer
from minillm.utils import atomic_write_text, pick_device, safe_torch_load, write_json

# One spec per method, at the defaults the lesson discusses; None is full fine-tuning.
METHOD_SPECS: dict[str, dict[str, Any] | None] = {
    "full": None,
    "lora": {"method": "lora", "r": 8, "lora_alpha": 8, "target_modules": ["c_attn"]},
    "vera": {"method": "vera"},
    "krona": {"method": "krona"},
    "houlsby": {"method": "houlsby"},
    "pfeiffer": {"method": "pfeiffer"},
    "parallel": {"method": "parallel"},
    "prefix": {"method": "prefix", "num_virtual_tokens": 10},
    "prompt": {"method": "prompt", "num_virtual_tokens": 10},
    "last_k": {"method": "last_k", "k": 1},
    "bitfit": {"method": "bitfit"},
}
DEFAULT_METHODS = tuple(METHOD_SPECS)
PEFT_LR_MULTIPLIER = 20.0  # PEFT lr = 20 x the preset's full fine-tuning lr (cpu: 5e-4 -> 1e-2; see lesson 7)


def method_spec(method: str, token_ids: Sequence[int] | None = None) -> dict[str, Any] | None:
    """A fresh copy of METHOD_SPECS[method]; a PEFT method also trains the rows `token_ids` if given."""
    spec = copy.deepcopy(METHOD_SPECS[method])
    if spec is not None and token_ids:
        spec["trainable_token_indices"] = list(token_ids)
    return spec


def parse_methods(text: str | Sequence[str] | None, specs: dict[str, Any] | None = None,
                  default: Sequence[str] | None = None) -> list[str]:
    """'lora,full' or ['lora', 'full'] -> a validated list (None: every default method), in the given order.

    specs/default: the method table to validate against (this module's unless given)."""
    specs = METHOD_SPECS if specs is None else specs
    if text is None:
        return list(DEFAULT_METHODS if default is None else default)
    names = [m.strip() for m in text.split(",")] if isinstance(text, str) else list(text)
    names = [m for m in names if m]
    unknown = [m for m in names if m not in specs]
    if unknown or not names:
        raise ValueError(f"--methods: unknown method {unknown[0] if unknown else '(none given)'!r}; "
                         f"choose from {list(specs)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--methods: a method is listed twice in {names}")
    return names


# ---------------------------------------------------------------------- counting parameters and bytes
def parameter_share(model: nn.Module) -> dict[str, Any]:
    """{"trainable", "total", "percent"}: percent = 100 * trainable / total, every parameter counted once."""
    trainable, total = count_parameters(model)
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total}


def build_meta_model(model_cfg: GPTConfig, spec: dict[str, Any] | None) -> nn.Module:
    """The GPT of `model_cfg` with the PEFT `spec` applied, on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        model = GPT(model_cfg)
    if spec is None:
        return model
    return apply_peft(model, spec["method"], **{k: v for k, v in spec.items() if k != "method"})


def analytic_parameter_table(
    preset: str = "gpu",
    vocab_size: int | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    token_ids: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Trainable parameters, their share and the training bytes of each method at `preset`'s model shape
    (PEFT methods also training the rows `token_ids`, as in the measured table).

    Nothing is trained or allocated (meta device). vocab_size defaults to the preset's tokenizer size.
    """
    p = get_preset(preset)
    cfg = replace(p.model, vocab_size=vocab_size or p.vocab_size)
    rows = []
    for method in parse_methods(list(methods)):
        model = build_meta_model(cfg, method_spec(method, token_ids))
        rows.append({"method": method, **parameter_share(model), "train_bytes": training_memory(model)["total"]})
    return rows


# ---------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer read afterwards includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _clock(device: torch.device) -> Callable[[], float]:
    """CPU: the process's CPU time, which other programs on a shared machine barely disturb (wall time can
    triple under load while CPU time moves by 1%); GPU: wall time, read after synchronising."""
    return time.process_time if device.type == "cpu" else time.perf_counter


def _time_call(model: nn.Module, idx: torch.Tensor) -> float:
    clock = _clock(idx.device)
    _sync(idx.device)
    t0 = clock()
    model(idx)
    _sync(idx.device)
    return clock() - t0


@torch.no_grad()
def forward_seconds(
    models: dict[str, nn.Module], idx: torch.Tensor, repeats: int = 5, budget_seconds: float = 1.0
) -> dict[str, float]:
    """Best (minimum) seconds of one forward pass on `idx` (B, T) for each model.

    The models take turns call by call (round-robin), so a change in machine load hits all of them alike,
    and there are at least `repeats` rounds, more while the whole timing fits in about `budget_seconds`.
    Compare the ratios between models, not the absolute times.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for model in models.values():  # warm-up: first-call allocations are not the method's cost
        model.eval()(idx)
    first = sum(_time_call(m, idx) for m in models.values())
    rounds = max(repeats, min(1000, int(budget_seconds / max(first, 1e-9))))
    best = {name: math.inf for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            best[name] = min(best[name], _time_call(model, idx))
    return best


def is_mergeable(model: nn.Module) -> bool:
    """True when `merge_peft` can fold everything trained into the weights: LoRA/VeRA/KronA layers or
    trained token rows, and no bottleneck adapter or virtual tokens (those stay in the forward pass)."""
    if isinstance(model, WRAPPERS) or any(isinstance(m, ADAPTER_LAYERS) for m in model.modules()):
        return False
    return any(isinstance(m, MERGEABLE_LAYERS) for m in model.modules())


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain GPT with the adapter folded in (W' = W + Delta W); the trained model is left as it is."""
    return merge_peft(copy.deepcopy(model)).eval()


def slowdowns(
    base: nn.Module, model: nn.Module, idx: torch.Tensor, repeats: int = 5, budget_seconds: float = 1.0
) -> dict[str, float | None]:
    """{"unmerged": t(model) / t(base), "merged": t(merged model) / t(base) or None when it cannot merge}."""
    models = {"base": base, "unmerged": model}
    if is_mergeable(model):
        models["merged"] = merged_copy(model)
    t = forward_seconds(models, idx, repeats, budget_seconds)
    return {"unmerged": t["unmerged"] / t["base"], "merged": t["merged"] / t["base"] if "merged" in t else None}


# ---------------------------------------------------------------------- one comparison run
def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """sft_test-style rows ({messages: [user, assistant], kind, ...}); a bad row raises `path:line: why`."""

    records = []
    for lineno, record in read_jsonl(path):
        roles = [m.get("role") for m in record.get("messages", []) if isinstance(m, dict)]
        if "user" not in roles or "assistant" not in roles:
            raise ValueError(f"{path}:{lineno}: a test record needs 'messages' with a user and an assistant turn")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no test records")
    return records


def method_train_config(method: str, full_cfg: TrainConfig, peft_lr: float | None,
                        specs: dict[str, Any] | None = None) -> TrainConfig:
    """Full fine-tuning uses `full_cfg`; a PEFT method the same with lr = peft_lr (default
    PEFT_LR_MULTIPLIER x full_cfg.lr) and min_lr scaled alike, so the schedule keeps its shape."""
    if (METHOD_SPECS if specs is None else specs)[method] is None:
        return full_cfg
    lr = peft_lr if peft_lr is not None else PEFT_LR_MULTIPLIER * full_cfg.lr
    return replace(full_cfg, lr=lr, min_lr=full_cfg.min_lr * lr / full_cfg.lr)


def _state_dict_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def _optimizer_of_run(model: nn.Module, cfg: TrainConfig, ckpt: Path) -> torch.optim.Optimizer:
    """The run's AdamW with the state it ended with (moments read back from ckpt.pt)."""

    optimizer = configure_optimizer(model, cfg)
    optimizer.load_state_dict(safe_torch_load(ckpt)["optimizer"])
    return optimizer


def compare_one(
    method: str,
    spec: dict[str, Any] | None,
    init: str | os.PathLike,
    data: str | os.PathLike,
    records: list[dict[str, Any]],
    tokenizer: Any,
    out: Path,
    train_cfg: TrainConfig,
    base: nn.Module,
    timing_idx: torch.Tensor,
    timing_repeats: int = 5,
    timing_seconds: float = 1.0,
    keep_checkpoint: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune `init` with one method (PEFT `spec`, None = full) and measure it; returns the table row."""

    run_dir = out / method
    run = run_sft(init, data, run_dir, train_cfg, peft=copy.deepcopy(spec), progress=progress)
    model, result = run.model, run.result
    memory = training_memory(model, _optimizer_of_run(model, train_cfg, run_dir / "ckpt.pt"))
    adapter = run_dir / "adapter.pt"
    stored = adapter.stat().st_size if spec is not None else _state_dict_bytes(model)
    if spec is not None and not keep_checkpoint:  # it repeats the frozen base; adapter.pt is the result
        (run_dir / "ckpt.pt").unlink()
    scores = evaluate_instructions(model, tokenizer, records)
    base = base.to(timing_idx.device)
    slow = slowdowns(base, model.to(timing_idx.device), timing_idx, timing_repeats, timing_seconds)
    row = {
        "method": method, **parameter_share(model), "adapter_bytes": stored, "train_seconds": result.seconds,
        "train_bytes": memory["total"], "memory": memory, "lr": train_cfg.lr, "steps": result.step,
        "train_loss": result.train_loss, "val_loss": result.val_loss,
        "exact_match": scores["exact_match"], "refusal_accuracy": scores["refusal_accuracy"],
        "gold_reward": scores["gold_reward"], "slowdown_unmerged": slow["unmerged"],
        "slowdown_merged": slow["merged"], "spec": spec,
    }
    print(f"[peft-compare] {method}: {row['trainable']:,} trainable ({row['percent']:.3f}%), "
          f"exact match {row['exact_match']:.3f}, {result.seconds:.1f}s")
    return row


def compare_methods(
    init: str | os.PathLike,
    data: str | os.PathLike,
    test_data: str | os.PathLike,
    out: str | os.PathLike,
    full_cfg: TrainConfig,
    methods: Sequence[str] = DEFAULT_METHODS,
    peft_lr: float | None = None,
    analytic_preset: str | None = "gpu",
    timing_repeats: int = 5,
    timing_seconds: float = 3.0,
    keep_checkpoints: bool = False,
    chat_tokens: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every method in `methods` from the base run `init`; writes results.json, table.md and
    comparison.png to `out` and returns the summary ({"rows", "analytic", ...}).

    chat_tokens: PEFT methods also train the chat template tokens' embedding rows (see the module doc).
    """

    methods = parse_methods(list(methods))
    out = Path(out)
    records = load_records(test_data)
    base, tok, base_cfg = load_run(init, device=full_cfg.device)
    base_share = parameter_share(base)
    token_ids = chat_token_ids(tok) if chat_tokens else None
    # One timing input for every method: real tokens only, leaving room for the longest virtual prefix.
    virtual = max((METHOD_SPECS[m] or {}).get("num_virtual_tokens", 0) for m in methods)
    gen = torch.Generator().manual_seed(0)
    timing_idx = torch.randint(0, base.config.vocab_size, (4, base.config.block_size - virtual), generator=gen)
    timing_idx = timing_idx.to(pick_device(full_cfg.device))
    rows = []
    for method in methods:
        cfg = method_train_config(method, full_cfg, peft_lr)
        rows.append(compare_one(method, method_spec(method, token_ids), init, data, records, tok, out, cfg, base,
                                timing_idx, timing_repeats, timing_seconds, keep_checkpoints, progress))
    full = next((r for r in rows if r["method"] == "full"), None)
    for r in rows:
        r["exact_match_vs_full"] = (r["exact_match"] / full["exact_match"]
                                    if full and full["exact_match"] > 0 else None)
    analytic = None
    if analytic_preset:
        analytic = {"preset": analytic_preset, "vocab_size": tok.vocab_size,
                    "rows": analytic_parameter_table(analytic_preset, tok.vocab_size, methods, token_ids)}
    summary = {"init": str(init), "base": {"parameters": base_share["total"], "model": base_cfg["model"]},
               "full_lr": full_cfg.lr, "steps": full_cfg.max_steps, "chat_tokens": token_ids,
               "test_data": str(test_data), "timing_input": list(timing_idx.shape), "rows": rows, "analytic": analytic}
    write_json(out / "results.json", summary)
    atomic_write_text(out / "table.md", render_report(summary))
    plot_comparison(rows, out / "comparison.png")
    return summary


# ---------------------------------------------------------------------- report
def _mb(n: int) -> str:
    return f"{n / 2**20:.2f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def render_table(rows: list[dict[str, Any]]) -> str:
    """The measured comparison as a markdown table (one row per method)."""
    lines = ["| method | trainable | % of total | adapter file (KB) | train time (s) | params+grads+AdamW (MB) | "
             "val loss | exact match | vs full | refusals | slowdown unmerged | slowdown merged |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        val = "-" if r["val_loss"] is None else f"{r['val_loss']:.3f}"
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {r['percent']:.3f} | {r['adapter_bytes'] / 1024:,.1f} | "
            f"{r['train_seconds']:.1f} | {_mb(r['train_bytes'])} | {val} | {r['exact_match']:.3f} | "
            f"{_ratio(r.get('exact_match_vs_full'))} | {r['refusal_accuracy']:.3f} | {r['slowdown_unmerged']:.2f} | "
            f"{_ratio(r['slowdown_merged'])} |"
        )
    return "\n".join(lines)


def render_analytic_table(rows: list[dict[str, Any]]) -> str:
    """The analytic (meta-device) parameter counts as a markdown table."""
    lines = ["| method | trainable | total | % of total | params+grads+AdamW fp32 (MB) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['method']} | {r['trainable']:,} | {r['total']:,} | {r['percent']:.3f} | {_mb(r['train_bytes'])} |"
              for r in rows]
    return "\n".join(lines)


def render_report(summary: dict[str, Any]) -> str:
    """table.md: the measured table, how it was measured, and the analytic table."""
    rows = summary["rows"]
    m = summary["base"]["model"]
    text = [
        "# PEFT comparison", "",
        f"Base run `{summary['init']}`: {m['n_layer']} layers, {m['n_embd']} wide, "
        f"{summary['base']['parameters']:,} parameters. {summary['steps']} SFT steps per method; learning rate "
        f"{summary['full_lr']:g} for full fine-tuning, "
        + ", ".join(sorted({f"{r['lr']:g}" for r in rows if r['spec'] is not None})) + " for the PEFT methods.",
        "Val loss: SFT loss (nats per response token) on the held-out 5% of the training chats. "
        f"Exact match: greedy answers to `{summary['test_data']}` (fact and arithmetic questions); refusals: the "
        "share of its forbidden requests refused. "
        f"Slowdown: forward time / base forward time on a {tuple(summary['timing_input'])} batch, best of N, "
        "timed round-robin in the same run (CPU time on a CPU); merged = the update folded into W (LoRA, VeRA, KronA, token rows).",
        ("PEFT methods also train the embedding rows of the chat tokens "
         f"{summary['chat_tokens']} (`trainable_token_indices`)." if summary.get("chat_tokens")
         else "PEFT methods train no embedding rows (--no-chat-tokens)."), "",
        render_table(rows), "", "![comparison](comparison.png)", "",
    ]
    if summary.get("analytic"):
        a = summary["analytic"]
        text += [f"## Parameter counts at the `{a['preset']}` preset (analytic, vocabulary {a['vocab_size']})", "",
                 render_analytic_table(a["rows"]), ""]
    return "\n".join(text)


def plot_comparison(rows: list[dict[str, Any]], png_path: str | os.PathLike) -> Path:
    """Bar charts per method: trainable share (log scale), validation loss, held-out exact match, slowdown."""
    from matplotlib.figure import Figure

    names = [r["method"] for r in rows]
    fig = Figure(figsize=(16, 3.8))
    axes = fig.subplots(1, 4)
    panels = [("trainable parameters (% of total, log)", [r["percent"] for r in rows]),
              ("SFT validation loss (lower is better)", [r["val_loss"] or 0.0 for r in rows]),
              ("held-out exact match", [r["exact_match"] for r in rows]),
              ("forward time / base (unmerged)", [r["slowdown_unmerged"] for r in rows])]
    for ax, (title, values) in zip(axes, panels):
        colors = ["tab:gray" if n == "full" else "tab:blue" for n in names]
        ax.bar(names, values, color=colors)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=60)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_yscale("log")
    axes[3].axhline(1.0, color="k", lw=0.8)
    fig.tight_layout()
    return save_figure(fig, png_path)


# ---------------------------------------------------------------------- command line
