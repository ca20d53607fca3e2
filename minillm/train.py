"""One training loop for every stage: pretraining, SFT, the reward model and DPO.

    step s:  lr_s = warmup then cosine(lr, min_lr)
             g = (1 / N) * sum over micro-batches of grad(sum of per-unit losses)    N = units in the step
             g <- g * min(1, clip / ||g||)
             theta <- AdamW(theta, g, lr_s)   (weight decay on matrices only)

A stage supplies a batch source and `loss_fn(model, batch) -> (loss_sum, n_units)`: the *sum* of its
per-unit losses (tokens for language modelling, pairs for DPO) and how many units it summed. An offline
source is `get_batch(split, generator)` (a fixed data set); an on-policy source (`on_policy=True`) is
`get_batch(split, generator, model, step)`: it sees the model being trained, so rollout -> score ->
advantage (PPO, GRPO), a distillation teacher scoring the student's samples, or a reference model's
log-probs are all just batch sources, and the loop stays the same.
The loop divides the accumulated gradient by the units of the whole effective batch, so one micro-batch of 8
and four micro-batches of 2 give the same update (per-micro-batch means would weight short batches more).
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from minillm.config import TrainConfig
from minillm.model import GPTConfig
from minillm.plots import plot_loss_curve
from minillm.utils import atomic_torch_save, autocast_dtype, pick_device, rng_state, safe_torch_load, set_rng_state

Batch = Any
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, int | torch.Tensor]]
GetBatch = Callable[[str, torch.Generator], Batch]
OnPolicyGetBatch = Callable[[str, torch.Generator, nn.Module, int], Batch]  # (split, gen, model, step)
CKPT_NAME = "ckpt.pt"


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr at max_steps.

    Warmup step s (0-based) uses lr * (s + 1) / (W + 1): the first step already moves (lr / (W + 1), not 0, which
    would waste a step), and lr is reached at step W, where the cosine starts (nanoGPT's convention).
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # 1 -> 0
    return cfg.min_lr + cosine * (cfg.lr - cfg.min_lr)


def configure_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay only on matrices (not biases, LayerNorm gains).

    Pulling a bias or a LayerNorm gain toward 0 would fight its job (a gain of 0 switches a feature off).
    Embedding tables are matrices and are decayed, as in GPT-2/nanoGPT; with weight_decay = 0 (the SFT
    presets) a row that gets no gradient stays exactly where it is.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("configure_optimizer: the model has no trainable parameters")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:  # the fused kernel (CPU and CUDA, torch >= 2.4) is the same update in one pass over memory
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor in a (nested) dict/list/tuple batch to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_tokens(batch: Batch) -> int:
    """Tokens in a batch, for tokens/s: the size of its `input_ids` (or first tensor)."""
    if isinstance(batch, dict):
        t = batch.get("input_ids", next(v for v in batch.values() if isinstance(v, torch.Tensor)))
    elif isinstance(batch, (list, tuple)):
        t = batch[0]
    else:
        t = batch
    return int(t.numel())


@dataclass
class TrainResult:
    step: int
    train_loss: float
    val_loss: float | None
    seconds: float
    tokens_per_s: float


def _autocast(device: torch.device, cfg: TrainConfig):
    dtype = autocast_dtype(device) if cfg.dtype == "auto" else None
    return (torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()), dtype


def draw(get_batch: GetBatch | OnPolicyGetBatch, split: str, gen: torch.Generator, model: nn.Module, step: int,
         on_policy: bool) -> Batch:
    """One batch from an offline source (split, gen) or an on-policy one (split, gen, model, step)."""
    return get_batch(split, gen, model, step) if on_policy else get_batch(split, gen)


@torch.no_grad()
def estimate_loss(model: nn.Module, get_batch: GetBatch | OnPolicyGetBatch, loss_fn: LossFn, split: str, iters: int,
                  device: torch.device, cfg: TrainConfig, seed: int = 0, step: int = 0,
                  on_policy: bool = False) -> float:
    """Mean loss per unit over `iters` batches of `split`, from a fixed generator so evals are comparable."""
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    total, units = 0.0, 0.0
    ctx, _ = _autocast(device, cfg)
    for _ in range(iters):
        batch = to_device(draw(get_batch, split, gen, model, step, on_policy), device)
        with ctx:
            loss_sum, n = loss_fn(model, batch)
        total += float(loss_sum)
        units += float(n)
    model.train(was_training)
    return total / max(units, 1.0)


def model_config_with_defaults(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """A saved network config with the fields added since it was written at their defaults (GPT-2's), so an older
    checkpoint still resumes."""
    try:
        return asdict(GPTConfig.from_dict(model_cfg))
    except (TypeError, ValueError):
        return model_cfg


def check_same_config(saved: dict[str, Any], current: dict[str, Any], what: str) -> None:
    """Raise if a checkpoint's config differs from the one asked for, naming the fields."""
    diff = {k: (saved.get(k), current.get(k)) for k in set(saved) | set(current) if saved.get(k) != current.get(k)}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs requested {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"{what} was written for another configuration ({lines})")


def train(
    model: nn.Module,
    cfg: TrainConfig,
    get_batch: GetBatch | OnPolicyGetBatch,
    loss_fn: LossFn,
    out_dir: str | Path,
    resume: bool = False,
    run_config: dict[str, Any] | None = None,
    desc: str = "train",
    has_val: bool = True,
    progress: bool = True,
    on_policy: bool = False,
) -> TrainResult:
    """Run cfg.max_steps optimiser steps (continuing from out_dir/ckpt.pt when resume=True).

    on_policy=True calls get_batch(split, generator, model, step) with the model as it is at that step (in
    train mode: a source that samples switches to eval mode and no_grad itself, and back).

    Writes out_dir/metrics.jsonl (one JSON line per log/eval), out_dir/ckpt.pt (model, optimizer, step,
    RNG states, run_config; atomically) and out_dir/loss_curve.png. Returns the final losses and speed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(out_dir):
        return _train(model, cfg, get_batch, loss_fn, out_dir, resume, run_config, desc, has_val, progress, on_policy)


LOCK_NAME = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


@contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """out_dir/.lock holds the writing process's pid while a run trains, so two runs cannot interleave their
    checkpoints and metrics in one folder; a lock left by a process that no longer exists is taken over."""
    lock = out_dir / LOCK_NAME
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                owner = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and owner != os.getpid() and _pid_alive(owner):
                raise FileExistsError(f"{out_dir} is being written by another run (pid {owner}, {lock}); wait for it "
                                      "or choose another --out") from None
            print(f"[train] {lock}: taking over a stale lock (pid {owner or '?'} is gone)")
            lock.unlink(missing_ok=True)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _train(model: nn.Module, cfg: TrainConfig, get_batch: GetBatch | OnPolicyGetBatch, loss_fn: LossFn, out_dir: Path,
           resume: bool, run_config: dict[str, Any] | None, desc: str, has_val: bool, progress: bool,
           on_policy: bool) -> TrainResult:
    """The loop of `train`, inside its lock."""
    device = pick_device(cfg.device)
    model.to(device)
    optimizer = configure_optimizer(model, cfg)
    ctx, amp_dtype = _autocast(device, cfg)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    batch_gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    run_config = run_config or {}
    metrics_path = out_dir / "metrics.jsonl"
    step = 0
    if resume:
        step = load_training_state(out_dir / CKPT_NAME, model, optimizer, batch_gen, run_config)
        _truncate_metrics(metrics_path, step)
        _remove_stray_temporaries(out_dir)
    elif metrics_path.exists():
        metrics_path.unlink()
    params = [p for p in model.parameters() if p.requires_grad]

    model.train()
    t_start = time.perf_counter()
    tokens_seen, train_loss, val_loss, tok_s = 0, float("nan"), None, 0.0
    bar = tqdm(total=cfg.max_steps, initial=step, desc=desc, disable=not progress, mininterval=1.0,
               dynamic_ncols=True)
    t_log, tokens_log = time.perf_counter(), 0
    while step < cfg.max_steps:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_total, units_total = 0.0, 0.0
        for micro in range(cfg.grad_accum):
            batch = to_device(draw(get_batch, "train", batch_gen, model, step, on_policy), device)
            with ctx:
                loss_sum, n = loss_fn(model, batch)
            value = float(loss_sum.detach())
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"{desc}: the loss is {value} at step {step + 1}, micro-batch {micro + 1} of {cfg.grad_accum}; "
                    f"stopped before writing a checkpoint (the last good one, if any, is in {out_dir})")
            (scaler.scale(loss_sum) if scaler else loss_sum).backward()
            loss_total += value
            units_total += float(n)
            tokens_log += batch_tokens(batch)
        if scaler:
            scaler.unscale_(optimizer)
        # The gradient of the sum, divided by the units of the whole effective batch.
        for p in params:
            if p.grad is not None:
                p.grad.mul_(1.0 / max(units_total, 1.0))
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        train_loss = loss_total / max(units_total, 1.0)
        bar.update(1)
        record: dict[str, Any] = {}
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            elapsed = time.perf_counter() - t_log
            tok_s = tokens_log / max(elapsed, 1e-9)
            tokens_seen += tokens_log
            t_log, tokens_log = time.perf_counter(), 0
            record.update(step=step, loss=train_loss, lr=lr, grad_norm=float(grad_norm), tokens_per_s=tok_s)
            bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tok_s:,.0f}")
        if has_val and ((cfg.eval_interval and step % cfg.eval_interval == 0) or step == cfg.max_steps):
            val_loss = estimate_loss(model, get_batch, loss_fn, "val", cfg.eval_iters, device, cfg, step=step,
                                     on_policy=on_policy)
            record.update(step=step, val_loss=val_loss)
            bar.write(f"{desc} step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
        if record:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if (cfg.ckpt_interval and step % cfg.ckpt_interval == 0) or step == cfg.max_steps:
            save_training_state(out_dir / CKPT_NAME, model, optimizer, step, batch_gen, run_config)
    bar.close()
    seconds = time.perf_counter() - t_start
    if metrics_path.exists():

        plot_loss_curve(metrics_path, out_dir / "loss_curve.png", title=desc)
    return TrainResult(step=step, train_loss=train_loss, val_loss=val_loss, seconds=seconds, tokens_per_s=tok_s)


def save_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                        batch_gen: torch.Generator, run_config: dict[str, Any]) -> None:
    """Everything needed to continue exactly: weights, optimizer moments, step, every RNG, the config."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "rng": rng_state(),
        "batch_rng": batch_gen.get_state(),
        "run_config": run_config,
    }
    atomic_torch_save(state, path)


def load_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        batch_gen: torch.Generator, run_config: dict[str, Any]) -> int:
    """Restore a checkpoint written by `save_training_state`; returns the step to continue from."""
    state = safe_torch_load(path)
    for key in ("model", "optimizer", "step", "rng", "batch_rng", "run_config"):
        if key not in state:
            raise ValueError(f"{path}: not a minillm training checkpoint (missing {key!r})")
    saved_model_cfg = state["run_config"].get("model", {})
    if run_config.get("model") is not None:
        check_same_config(model_config_with_defaults(saved_model_cfg), model_config_with_defaults(run_config["model"]),
                          str(path))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    batch_gen.set_state(state["batch_rng"])
    return int(state["step"])


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (a crash between log and save), and a torn
    last line (a crash in the middle of writing it), with a notice; a broken line before the last is an error."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = []
    for i, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):
                print(f"[resume] {path}:{i}: skipped a torn last line (the run stopped while writing it)")
                break
            raise ValueError(f"{path}:{i}: invalid JSON ({e.msg})") from e
        if record.get("step", 0) <= step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))


def _remove_stray_temporaries(out_dir: Path) -> None:
    """A kill during `atomic_torch_save` leaves `.ckpt.pt.<random>.tmp` beside the checkpoint: remove ours."""
    for tmp in out_dir.glob(f".{CKPT_NAME}.*.tmp"):
        print(f"[resume] removed {tmp} (left by an interrupted checkpoint write)")
        tmp.unlink()


def run_config_dict(**parts: Any) -> dict[str, Any]:
    """A JSON-able run config from dataclasses and plain values."""
    return {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in parts.items()}
