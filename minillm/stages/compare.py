"""Fine-tune one base run with several methods and tabulate what each trains, stores, costs and reaches.

Two experiments share one loop (`run_methods`): for each method name, its PEFT spec from the experiment's
table (None = full fine-tuning), its TrainConfig, `minillm.stages.sft.run_sft` on the same base run and SFT
data, then the same row for every method:

    trainable share   = |phi| / (|theta_0| + |phi|)          (PEFT's print_trainable_parameters convention;
                                                              a tied weight is counted once)
    training bytes    = weights + buffers + gradients + AdamW state     (`minillm.memory.training_memory`)
                      = 4 |theta| + 4 |phi| + 8 |phi| (+ 4 per trained tensor: AdamW's step)   in fp32,
                        the moments read back from the run's checkpoint; activations are not counted
    exact match       = held-out instruction following (`evaluate_instructions` on sft_test.jsonl)
    time, losses      = the run's TrainResult (val loss: SFT loss on the held-out share of the chats)

An experiment is a method table plus its own columns and sections:

* `peft-compare` (`compare_methods`, METHOD_SPECS): full fine-tuning and every PEFT method, plus
      adapter bytes = size of adapter.pt, the per-task file (full fine-tuning: the whole state dict)
      slowdown      = t_forward(adapted) / t_forward(base), best of N, timed round-robin in the same run
                      (CPU time on the CPU, see `forward_seconds`), unmerged and, for LoRA/VeRA/KronA,
                      merged into the weights (W' = W + Delta W)
  and `analytic_parameter_table`: the same parameter counts for any preset (e.g. GPT-2 small, the `gpu`
  preset) without training, the model built on PyTorch's `meta` device (shapes, no storage).
  Houlsby et al., 2019; Hu et al., 2021; He et al., 2022 compare such methods in one framework.

* `qlora-compare` (`compare_qlora`, QLORA_SPECS): QLoRA (Dettmers et al., 2023) claims that LoRA through a
  frozen NF4 base matches 16-bit LoRA while the frozen weights take ~4.127 instead of 16 bits:

       full    theta <- AdamW(theta, grad)                                 every parameter trains
       lora    y = W x + b + s B A x                                       W frozen in fp32
       qlora   y = dequant(W_nf4) x + b + s B A x                          W frozen in NF4 + double quant

  LoRA and QLoRA share targets (every linear layer), rank, alpha and learning rate, so the 4-bit base is the
  only difference; the table adds the memory split, the QLoRA - LoRA verdict, the quantisation error of NF4,
  FP4 and int4 on the base run's weights (`minillm.quant.error`) and the analytic memory at larger shapes.

Because PEFT methods train few parameters from a fixed starting point, they want a larger learning rate than
full fine-tuning: `PEFT_LR_MULTIPLIER` times the preset's SFT learning rate unless peft_lr is given (a sweep
on the tiny and cpu presets, lesson 7). Every PEFT method also trains the embedding rows of the chat
template's four tokens (`trainable_token_indices`, `minillm.peft.tokens`): pretraining never saw them, and
with frozen embeddings no method learns to emit <|end|> (`--no-chat-tokens` shows the difference).
"""
from __future__ import annotations

import copy
import io
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minillm.config import TrainConfig, get_preset
from minillm.datasets import read_jsonl
from minillm.eval.task import evaluate_instructions
from minillm.memory import MODEL_PRESETS, format_memory_table, gpt2_param_count, memory_table, training_memory
from minillm.model import GPT, GPTConfig
from minillm.peft.apply import (
    ADAPTER_LAYERS, MERGEABLE_LAYERS, QLORA_TARGETS, WRAPPERS, apply_peft, count_parameters, linear_weights, merge_peft,
)
from minillm.peft.tokens import chat_token_ids
from minillm.plots import Figure, save_figure
from minillm.quant.error import quantization_error_table, render_error_table
from minillm.runs import Run, load_run
from minillm.stages.evaluate import alignment_tax, retained_knowledge
from minillm.stages.sft import run_sft
from minillm.tokenizer import Tokenizer
from minillm.train import configure_optimizer
from minillm.utils import atomic_write_text, pick_device, safe_torch_load, write_json

PEFT_LR_MULTIPLIER = 20.0  # PEFT lr = 20 x the preset's full fine-tuning lr (cpu: 5e-4 -> 1e-2; see lesson 7)

# peft-compare: one spec per method, at the defaults lesson 7 discusses; None is full fine-tuning.
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

# qlora-compare: LoRA and QLoRA on every linear layer (as the QLoRA repo does) with the same rank and alpha;
# "loftq" is QLoRA with LoftQ initialisation (Li et al., 2023), on request (--methods).
LORA_R, LORA_ALPHA = 8, 16
QLORA_SPECS: dict[str, dict[str, Any] | None] = {
    "full": None,
    "lora": {"method": "lora", "target_modules": QLORA_TARGETS, "r": LORA_R, "lora_alpha": LORA_ALPHA},
    "qlora": {"method": "qlora", "r": LORA_R, "lora_alpha": LORA_ALPHA},
    "loftq": {"method": "qlora", "r": LORA_R, "lora_alpha": LORA_ALPHA, "loftq_iters": 1},
}
QLORA_METHODS = ("full", "lora", "qlora")

Specs = Mapping[str, dict[str, Any] | None]
# An experiment's own columns: (the finished run, its PEFT spec) -> extra entries of its row.
Measure = Callable[[Run, dict[str, Any] | None], dict[str, Any]]


# ---------------------------------------------------------------------- methods
def method_spec(method: str, token_ids: Sequence[int] | None = None, specs: Specs = METHOD_SPECS,
                **overrides: Any) -> dict[str, Any] | None:
    """A fresh copy of specs[method] (None: full fine-tuning) with `overrides` (e.g. r, lora_alpha); a PEFT
    method also trains the embedding rows `token_ids` if given."""
    spec = copy.deepcopy(specs[method])
    if spec is None:
        return None
    spec.update(overrides)
    # None (not a missing key) tells run_sft not to add the chat tokens itself: the --no-chat-tokens ablation
    spec["trainable_token_indices"] = list(token_ids) if token_ids else None
    return spec


def parse_methods(text: str | Sequence[str] | None, specs: Specs = METHOD_SPECS,
                  default: Sequence[str] | None = None) -> list[str]:
    """'lora,full' or ['lora', 'full'] -> a validated list in the given order; None gives `default` (every
    method of `specs` unless given)."""
    if text is None:
        return list(specs if default is None else default)
    names = [m.strip() for m in text.split(",")] if isinstance(text, str) else list(text)
    names = [m for m in names if m]
    unknown = [m for m in names if m not in specs]
    if unknown or not names:
        raise ValueError(f"--methods: unknown method {unknown[0] if unknown else '(none given)'!r}; "
                         f"choose from {list(specs)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--methods: a method is listed twice in {names}")
    return names


def method_train_config(method: str, full_cfg: TrainConfig, peft_lr: float | None,
                        specs: Specs = METHOD_SPECS) -> TrainConfig:
    """Full fine-tuning uses `full_cfg`; a PEFT method the same with lr = peft_lr (default
    PEFT_LR_MULTIPLIER x full_cfg.lr) and min_lr scaled alike, so the schedule keeps its shape."""
    if specs[method] is None:
        return full_cfg
    lr = peft_lr if peft_lr is not None else PEFT_LR_MULTIPLIER * full_cfg.lr
    return replace(full_cfg, lr=lr, min_lr=full_cfg.min_lr * lr / full_cfg.lr)


def parameter_share(model: nn.Module) -> dict[str, Any]:
    """{"trainable", "total", "percent"}: percent = 100 * trainable / total, every parameter counted once."""
    trainable, total = count_parameters(model)
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total}


# ---------------------------------------------------------------------- the shared loop
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


@dataclass
class Setup:
    """What every method of an experiment shares: the base run, the held-out questions, the chat-token rows."""

    init: str | os.PathLike
    base: nn.Module
    tokenizer: Tokenizer
    base_cfg: dict[str, Any]
    test_data: str | os.PathLike
    records: list[dict[str, Any]]
    token_ids: list[int] | None  # embedding rows every PEFT method trains too (None: --no-chat-tokens)


def prepare(init: str | os.PathLike, test_data: str | os.PathLike, peft_lr: float | None, chat_tokens: bool,
            device: str = "cpu") -> Setup:
    """Check the inputs and load what the methods share, before any method spends minutes training."""
    if not Path(init).is_dir():
        raise FileNotFoundError(f"--init {init}: base run not found (run `python -m minillm pipeline` or "
                                "`python -m minillm pretrain --out DIR` first)")
    if peft_lr is not None and not peft_lr > 0:
        raise ValueError(f"--peft-lr must be > 0, got {peft_lr}")
    records = load_records(test_data)
    base, tok, base_cfg = load_run(init, device=device)
    token_ids = chat_token_ids(tok) if chat_tokens else None
    return Setup(init, base, tok, base_cfg, test_data, records, token_ids)


def _optimizer_of_run(model: nn.Module, cfg: TrainConfig, ckpt: Path) -> torch.optim.Optimizer:
    """The run's AdamW with the state it ended with (moments read back from ckpt.pt)."""
    optimizer = configure_optimizer(model, cfg)
    optimizer.load_state_dict(safe_torch_load(ckpt)["optimizer"])
    return optimizer


def score_run(method: str, spec: dict[str, Any] | None, run: Run, cfg: TrainConfig,
              records: list[dict[str, Any]]) -> dict[str, Any]:
    """The row every experiment reports for a finished run: parameters, time, bytes, losses, exact match."""
    model, result = run.model, run.result
    memory = training_memory(model, _optimizer_of_run(model, cfg, run.out / "ckpt.pt"))
    scores = evaluate_instructions(model, run.tokenizer, records)
    return {
        "method": method, "spec": spec, "lr": cfg.lr, "steps": result.step, **parameter_share(model),
        "train_seconds": result.seconds, "seconds_per_step": result.seconds / max(result.step, 1),
        "train_loss": result.train_loss, "val_loss": result.val_loss,
        "memory": memory, "train_bytes": memory["total"],
        "exact_match": scores["exact_match"], "refusal_accuracy": scores["refusal_accuracy"],
        "gold_reward": scores["gold_reward"],
    }


def run_methods(
    command: str,
    setup: Setup,
    methods: Sequence[str],
    specs: Specs,
    data: str | os.PathLike,
    out: str | os.PathLike,
    full_cfg: TrainConfig,
    peft_lr: float | None = None,
    spec_overrides: dict[str, Any] | None = None,
    measure: Measure | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Fine-tune the base run with each method (run in out/<method>) and return one row per method:
    `score_run`'s, plus `measure(run, spec)` for the experiment's own columns."""
    rows = []
    for method in methods:
        spec = method_spec(method, setup.token_ids, specs, **(spec_overrides or {}))
        cfg = method_train_config(method, full_cfg, peft_lr, specs)
        run = run_sft(setup.init, data, Path(out) / method, cfg, peft=copy.deepcopy(spec), progress=progress)
        row = score_run(method, spec, run, cfg, setup.records)
        rows.append({**row, **(measure(run, spec) if measure else {})})
        print(f"[{command}] {method}: {row['trainable']:,} trainable ({row['percent']:.3f}%), exact match "
              f"{row['exact_match']:.3f}, {row['train_seconds']:.1f}s, {_mb(row['train_bytes'])} MB "
              "params+buffers+grads+AdamW")
    return rows


def summarize(setup: Setup, full_cfg: TrainConfig, rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """results.json: the base run, the shared settings, the rows and the experiment's `extra` sections."""
    return {"init": str(setup.init),
            "base": {"parameters": count_parameters(setup.base)[1], "model": setup.base_cfg["model"]},
            "full_lr": full_cfg.lr, "steps": full_cfg.max_steps, "chat_tokens": setup.token_ids,
            "test_data": str(setup.test_data), "rows": rows, **extra}


def write_report(out: str | os.PathLike, summary: dict[str, Any], report: str) -> None:
    """out/results.json (the summary) and out/table.md (the rendered report)."""
    write_json(Path(out) / "results.json", summary)
    atomic_write_text(Path(out) / "table.md", report)


def report_header(title: str, summary: dict[str, Any]) -> list[str]:
    """The title and the sentence every report starts with: the base run, steps and learning rates."""
    m, rows = summary["base"]["model"], summary["rows"]
    peft_lrs = sorted({f"{r['lr']:g}" for r in rows if r["spec"] is not None})
    return [f"# {title}", "",
            f"Base run `{summary['init']}`: {m['n_layer']} layers, {m['n_embd']} wide, "
            f"{summary['base']['parameters']:,} parameters. {summary['steps']} SFT steps per method; learning rate "
            f"{summary['full_lr']:g} for full fine-tuning"
            + (f", {', '.join(peft_lrs)} for the PEFT methods." if peft_lrs else ".")]


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f}"


def _or_dash(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


# ====================================================================== peft-compare
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


def timing_input(base: nn.Module, methods: Sequence[str], device: str) -> torch.Tensor:
    """One timing batch for every method: real tokens only, leaving room for the longest virtual prefix."""
    virtual = max((METHOD_SPECS[m] or {}).get("num_virtual_tokens", 0) for m in methods)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, base.config.vocab_size, (4, base.config.block_size - virtual), generator=gen)
    return idx.to(pick_device(device))


def _state_dict_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def adapter_bytes_and_slowdowns(run: Run, spec: dict[str, Any] | None, base: nn.Module, timing_idx: torch.Tensor,
                                repeats: int, seconds: float, keep_checkpoint: bool) -> dict[str, Any]:
    """peft-compare's own columns (a `Measure`): the stored file's bytes and the forward slowdowns."""
    adapter = run.out / "adapter.pt"
    stored = adapter.stat().st_size if spec is not None else _state_dict_bytes(run.model)
    if spec is not None and not keep_checkpoint:  # it repeats the frozen base; adapter.pt is the result
        (run.out / "ckpt.pt").unlink()
    device = timing_idx.device
    slow = slowdowns(base.to(device), run.model.to(device), timing_idx, repeats, seconds)
    return {"adapter_bytes": stored, "slowdown_unmerged": slow["unmerged"], "slowdown_merged": slow["merged"]}


def _with_forgetting(run: Run, spec: dict[str, Any] | None, measure: Measure, world: Path) -> dict[str, Any]:
    """`measure`'s columns plus what the method kept of pretraining (`retained_knowledge`): LoRA learns less
    and forgets less (Biderman et al. 2024)."""
    return {**measure(run, spec), **retained_knowledge(run.model, run.tokenizer, world)}


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
    """peft-compare: run every method in `methods` from the base run `init`; writes results.json, table.md
    and comparison.png to `out` and returns the summary ({"rows", "analytic", ...}).

    chat_tokens: PEFT methods also train the chat template tokens' embedding rows (see the module doc).
    """
    methods = parse_methods(list(methods))
    setup = prepare(init, test_data, peft_lr, chat_tokens, full_cfg.device)
    timing_idx = timing_input(setup.base, methods, full_cfg.device)
    measure = partial(adapter_bytes_and_slowdowns, base=setup.base, timing_idx=timing_idx, repeats=timing_repeats,
                      seconds=timing_seconds, keep_checkpoint=keep_checkpoints)
    world = Path(data).parent  # the alignment tax needs the world's pretraining validation text and fact probes
    if (world / "corpus_val.txt").is_file() and (world / "probes.jsonl").is_file():
        measure = partial(_with_forgetting, measure=measure, world=world)
    rows = run_methods("peft-compare", setup, methods, METHOD_SPECS, data, out, full_cfg, peft_lr,
                       measure=measure, progress=progress)
    if "perplexity" in rows[0]:
        base = retained_knowledge(setup.base, setup.tokenizer, world)
        tax = {r["model"]: r for r in alignment_tax({"base": base, **{r["method"]: r for r in rows}})}
        for r in rows:
            r.update(perplexity_ratio=tax[r["method"]]["perplexity_ratio"], facts_lost=tax[r["method"]]["facts_lost"])
    full = next((r for r in rows if r["method"] == "full"), None)
    for r in rows:
        r["exact_match_vs_full"] = r["exact_match"] / full["exact_match"] if full and full["exact_match"] > 0 else None
    analytic = None
    if analytic_preset:
        vocab = setup.tokenizer.vocab_size
        analytic = {"preset": analytic_preset, "vocab_size": vocab,
                    "rows": analytic_parameter_table(analytic_preset, vocab, methods, setup.token_ids)}
    summary = summarize(setup, full_cfg, rows, timing_input=list(timing_idx.shape), analytic=analytic)
    write_report(out, summary, render_report(summary))
    plot_comparison(rows, Path(out) / "comparison.png")
    return summary


def render_table(rows: list[dict[str, Any]]) -> str:
    """The measured comparison as a markdown table (one row per method)."""
    lines = [("| method | trainable | % of total | adapter file (KB) | train time (s) | params+grads+AdamW (MB) | "
              "val loss | exact match | vs full | refusals | slowdown unmerged | slowdown merged | "
              "pretraining ppl x base | facts lost |"),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {r['percent']:.3f} | {r['adapter_bytes'] / 1024:,.1f} | "
            f"{r['train_seconds']:.1f} | {_mb(r['train_bytes'])} | {_or_dash(r['val_loss'], 3)} | "
            f"{r['exact_match']:.3f} | {_or_dash(r.get('exact_match_vs_full'))} | {r['refusal_accuracy']:.3f} | "
            f"{r['slowdown_unmerged']:.2f} | {_or_dash(r['slowdown_merged'])} | "
            f"{_or_dash(r.get('perplexity_ratio'))} | {_or_dash(r.get('facts_lost'), 3)} |"
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
    """peft-compare's table.md: the measured table, how it was measured, and the analytic table."""
    text = report_header("PEFT comparison", summary) + [
        ("Val loss: SFT loss (nats per response token) on the held-out 5% of the training chats. "
         f"Exact match: greedy answers to `{summary['test_data']}` (fact and arithmetic questions); refusals: the "
         "share of its forbidden requests refused. "
         f"Slowdown: forward time / base forward time on a {tuple(summary['timing_input'])} batch, best of N, "
         "timed round-robin in the same run (CPU time on a CPU); merged = the update folded into W (LoRA, VeRA, "
         "KronA, token rows)."),
        ("PEFT methods also train the embedding rows of the chat tokens "
         f"{summary['chat_tokens']} (`trainable_token_indices`)." if summary.get("chat_tokens")
         else "PEFT methods train no embedding rows (--no-chat-tokens)."), "",
        render_table(summary["rows"]), "", "![comparison](comparison.png)", "",
    ]
    if summary.get("analytic"):
        a = summary["analytic"]
        text += [f"## Parameter counts at the `{a['preset']}` preset (analytic, vocabulary {a['vocab_size']})", "",
                 render_analytic_table(a["rows"]), ""]
    return "\n".join(text)


def plot_comparison(rows: list[dict[str, Any]], png_path: str | os.PathLike) -> Path:
    """Bar charts per method: trainable share (log scale), validation loss, held-out exact match, slowdown."""
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


# ====================================================================== qlora-compare
def compare_qlora(
    init: str | os.PathLike,
    data: str | os.PathLike,
    test_data: str | os.PathLike,
    out: str | os.PathLike,
    full_cfg: TrainConfig,
    methods: Sequence[str] = QLORA_METHODS,
    peft_lr: float | None = None,
    r: int = LORA_R,
    lora_alpha: float = LORA_ALPHA,
    chat_tokens: bool = True,
    gaussian_numel: int = 2**20,
    progress: bool = True,
) -> dict[str, Any]:
    """qlora-compare: fine-tune the base run `init` with each method (LoRA/QLoRA at rank r, lora_alpha),
    tabulate the quantisation errors of its weights, and write table.md and results.json to `out`.
    Returns the summary ({"rows", "errors", ...})."""
    methods = parse_methods(list(methods), QLORA_SPECS)
    setup = prepare(init, test_data, peft_lr, chat_tokens)
    errors = quantization_error_table(linear_weights(setup.base), gaussian_numel=gaussian_numel)
    rows = run_methods("qlora-compare", setup, methods, QLORA_SPECS, data, out, full_cfg, peft_lr,
                       spec_overrides={"r": r, "lora_alpha": lora_alpha}, progress=progress)
    summary = summarize(setup, full_cfg, rows, r=r, lora_alpha=lora_alpha, errors=errors)
    write_report(out, summary, render_qlora_report(summary))
    return summary


def render_qlora_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per fine-tuning method with its memory split, exact match in points against LoRA."""
    lora = next((r["exact_match"] for r in rows if r["method"] == "lora"), None)
    lines = [("| method | trainable | frozen 4-bit (MB) | weights + buffers (MB) | grads (MB) | AdamW (MB) | "
              "total (MB) | train time (s) | s / step | val loss | exact match | vs LoRA (points) | refusal acc. | "
              "gold reward |"),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        m = r["memory"]
        delta = "-" if lora is None or r["method"] == "lora" else f"{100 * (r['exact_match'] - lora):+.1f}"
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {_mb(m['quantized_weights'])} | "
            f"{_mb(m['params'] + m['buffers'])} | {_mb(m['grads'])} | {_mb(m['optimizer'])} | {_mb(m['total'])} | "
            f"{r['train_seconds']:.1f} | {r['seconds_per_step']:.3f} | {_or_dash(r['val_loss'], 4)} | "
            f"{r['exact_match']:.3f} | {delta} | {r['refusal_accuracy']:.3f} | {r['gold_reward']:.3f} |")
    return "\n".join(lines)


def qlora_verdict(rows: Sequence[dict[str, Any]]) -> str | None:
    """'QLoRA - LoRA exact match: +x.x points (within the 5-point target)...', or None without both."""
    by = {r["method"]: r for r in rows}
    if "qlora" not in by or "lora" not in by:
        return None
    q, lo = by["qlora"], by["lora"]
    gap = 100 * (q["exact_match"] - lo["exact_match"])
    within = "within" if abs(gap) <= 5 else "NOT within"
    line = f"QLoRA - LoRA exact match: {gap:+.1f} points ({within} the 5-point target)"
    if lo["exact_match"] == 0:
        line += "; LoRA itself scores 0 here, so exact match cannot tell them apart: compare the val loss"
    if q["val_loss"] is not None and lo["val_loss"]:
        line += f". Validation loss QLoRA / LoRA = {q['val_loss'] / lo['val_loss']:.3f}"
    return line + "."


def render_analytic_memory(r: int = LORA_R, shapes: Sequence[str] = ("gpt2", "gpt2-xl", "7b-shaped")) -> str:
    """`minillm.memory.memory_table` for larger GPT-2-shaped models, LoRA/QLoRA on every linear layer."""
    text = []
    for name in shapes:
        shape = MODEL_PRESETS[name]
        n = gpt2_param_count(shape[0], shape[2], shape[3], shape[4])["total"]
        text += [f"**{name}** ({n / 1e6:,.0f}M parameters)", "",
                 format_memory_table(memory_table(*shape, lora_r=r, lora_targets=QLORA_TARGETS)), ""]
    return "\n".join(text)


def render_qlora_report(summary: dict[str, Any]) -> str:
    """qlora-compare's table.md: the fine-tuning table, the verdict against LoRA, the error table, the
    analytic memory."""
    text = report_header("QLoRA vs LoRA vs full fine-tuning", summary) + [
        f"LoRA and QLoRA: r = {summary['r']}, lora_alpha = {summary['lora_alpha']:g}, on every linear layer "
        f"({', '.join(QLORA_TARGETS)})"
        + (f", plus the chat tokens' embedding rows {summary['chat_tokens']}." if summary.get("chat_tokens")
           else "."),
        (f"Exact match: greedy answers to `{summary['test_data']}`. Bytes: measured from the tensors of the "
         "trained model and its AdamW state (fp32 unless 4-bit; activations not counted)."), "",
        render_qlora_table(summary["rows"]), "",
    ]
    verdict = qlora_verdict(summary["rows"])
    if verdict:
        text += [verdict, ""]
    text += ["## Quantisation error: relative MSE x 1e-3 = 1000 * sum (w - deq(quant(w)))^2 / sum w^2", "",
             "Blocks of 64, one absmax each; DQ = double quantisation of the absmax values (bitsandbytes).", "",
             render_error_table(summary["errors"]), "",
             (f"## Memory at larger shapes (analytic: `python -m minillm memory --preset gpt2-xl`, "
              f"here LoRA on every linear layer, r = {summary['r']}, 16 GiB GPU)"), "",
             render_analytic_memory(summary["r"])]
    return "\n".join(text)
