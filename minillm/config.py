"""Run configuration: dataclasses and the named presets (`tiny` for tests, `cpu` default, `gpu`).

A preset fills `GPTConfig` (the network) and `TrainConfig` (the optimisation); command-line flags override
single fields (`--n-layer 6 --lr 1e-3`), and every run writes the resolved config next to its outputs.
The vocabulary size is not a preset field: it always comes from the tokenizer.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields
from typing import Any

from minillm.model import GPTConfig


@dataclass
class TrainConfig:
    """Optimisation settings shared by every stage (pretraining, SFT, reward model, DPO)."""

    max_steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_iters: int = 10
    log_interval: int = 10
    ckpt_interval: int = 0  # 0: only at the end
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16/fp16 autocast on CUDA, fp32 elsewhere; or "float32"

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "grad_accum", "eval_iters", "log_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_interval", "ckpt_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"TrainConfig: need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if self.grad_clip < 0:
            raise ValueError(f"TrainConfig.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        if self.dtype not in ("auto", "float32"):
            raise ValueError(f"TrainConfig.dtype must be 'auto' or 'float32', got {self.dtype!r}")


@dataclass
class Preset:
    """A named bundle: network shape, pretraining settings, tokenizer vocabulary, stage step counts."""

    model: GPTConfig
    pretrain: TrainConfig
    sft: TrainConfig
    reward: TrainConfig
    dpo: TrainConfig
    vocab_size: int = 1024


PRESETS: dict[str, Preset] = {
    # Seconds: the unit tests and the notebooks' smoke runs.
    "tiny": Preset(
        model=GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64, dropout=0.0),
        pretrain=TrainConfig(max_steps=60, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=10,
                             eval_interval=30, eval_iters=2, log_interval=10),
        sft=TrainConfig(max_steps=40, batch_size=16, lr=1e-3, min_lr=1e-4, warmup_steps=5, weight_decay=0.0,
                        eval_interval=20, eval_iters=2, log_interval=10),
        reward=TrainConfig(max_steps=30, batch_size=16, lr=3e-4, min_lr=3e-5, warmup_steps=3, weight_decay=0.0,
                           eval_interval=15, eval_iters=2, log_interval=5),
        dpo=TrainConfig(max_steps=30, batch_size=16, lr=1e-4, min_lr=1e-5, warmup_steps=3, weight_decay=0.0,
                        eval_interval=15, eval_iters=2, log_interval=5),
    ),
    # The default: the whole pipeline in minutes on a 2-core laptop CPU.
    "cpu": Preset(
        model=GPTConfig(block_size=128, n_layer=2, n_head=4, n_embd=128, dropout=0.0),
        pretrain=TrainConfig(max_steps=1200, batch_size=24, lr=3e-3, min_lr=3e-4, warmup_steps=50,
                             eval_interval=300, eval_iters=8, log_interval=25),
        sft=TrainConfig(max_steps=500, batch_size=32, lr=5e-4, min_lr=5e-5, warmup_steps=30, weight_decay=0.0,
                        eval_interval=250, eval_iters=4, log_interval=25),
        # Reward model: TRL's default lr is 1e-4 (lesson 4 measures alternatives).
        reward=TrainConfig(max_steps=60, batch_size=32, lr=1e-4, min_lr=1e-5, warmup_steps=6, weight_decay=0.0,
                           eval_interval=30, eval_iters=2, log_interval=10),
        # DPO moves a model that already produces the chosen answers: a small step (lesson 6 measures 5e-6 vs
        # 2e-5; the larger one unlearns refusals). weight_decay 0 as in TRL.
        dpo=TrainConfig(max_steps=30, batch_size=32, lr=5e-6, min_lr=5e-7, warmup_steps=10, weight_decay=0.0,
                        eval_interval=15, eval_iters=2, log_interval=5),
    ),
    # GPT-2 small (124M) on one consumer GPU.
    "gpu": Preset(
        model=GPTConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768, dropout=0.0),
        pretrain=TrainConfig(max_steps=5000, batch_size=16, grad_accum=4, lr=6e-4, min_lr=6e-5,
                             warmup_steps=200, eval_interval=500, eval_iters=20, log_interval=50),
        sft=TrainConfig(max_steps=1000, batch_size=32, lr=1e-4, min_lr=1e-5, warmup_steps=50, weight_decay=0.0,
                        eval_interval=200, eval_iters=10, log_interval=50),
        reward=TrainConfig(max_steps=300, batch_size=32, lr=3e-5, min_lr=3e-6, warmup_steps=20, weight_decay=0.0,
                           eval_interval=100, eval_iters=8, log_interval=10),
        dpo=TrainConfig(max_steps=300, batch_size=32, lr=1e-6, min_lr=1e-7, warmup_steps=30, weight_decay=0.0,
                        eval_interval=100, eval_iters=8, log_interval=10),
    ),
}


def get_preset(name: str) -> Preset:
    """A deep copy of a named preset, so callers can override fields freely."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def override(obj: Any, values: dict[str, Any]) -> Any:
    """A copy of dataclass `obj` with the given fields replaced (validated by its __post_init__)."""
    known = {f.name for f in fields(obj)}
    unknown = sorted(k for k in values if k not in known)
    if unknown:
        raise ValueError(f"{type(obj).__name__}: unknown field(s) {unknown}")
    return type(obj)(**{**asdict(obj), **values})
