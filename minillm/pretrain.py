"""Pretraining: next-token prediction on the world corpus, and loading a trained run for later stages.

    L(theta) = -(1/N) sum_t log p_theta(x_{t+1} | x_{<=t})        over the N tokens of the batch
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from minillm.config import TrainConfig
from minillm.datasets import random_windows, tokenize_corpus
from minillm.model import GPT, GPTConfig
from minillm.tokenizer import Tokenizer
from minillm.train import CKPT_NAME, TrainResult, check_same_config, run_config_dict, train
from minillm.utils import pick_device, safe_torch_load, write_json

TOKENIZER_DIR = "tokenizer"


def lm_loss(model: GPT, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over every position of the batch, and the token count."""
    logits = model(batch["input_ids"])  # (B, T, V)
    loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), reduction="sum")
    return loss_sum, batch["targets"].numel()


def pretrain(
    tokenizer: Tokenizer,
    train_path: str | os.PathLike,
    val_path: str | os.PathLike,
    model_cfg: GPTConfig,
    train_cfg: TrainConfig,
    out_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
) -> tuple[GPT, TrainResult]:
    """Train a fresh GPT (vocab from the tokenizer) on train_path; writes a loadable run to out_dir."""
    if model_cfg.vocab_size != tokenizer.vocab_size:
        raise ValueError(
            f"model vocab_size {model_cfg.vocab_size} != tokenizer vocab_size {tokenizer.vocab_size}"
        )
    train_ids = tokenize_corpus(train_path, tokenizer)
    val_ids = tokenize_corpus(val_path, tokenizer)
    data = {"train": train_ids, "val": val_ids}

    def get_batch(split: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
        return random_windows(data[split], train_cfg.batch_size, model_cfg.block_size, gen)

    out_dir = Path(out_dir)
    torch.manual_seed(train_cfg.seed)
    model = GPT(model_cfg)
    run_config = run_config_dict(stage="pretrain", model=model_cfg, train=train_cfg,
                                 data={"train": str(train_path), "val": str(val_path)},
                                 train_tokens=int(train_ids.numel()))
    save_run_files(out_dir, tokenizer, run_config)
    result = train(model, train_cfg, get_batch, lm_loss, out_dir, resume=resume, run_config=run_config,
                   desc="pretrain", progress=progress)
    return model, result


def save_run_files(out_dir: Path, tokenizer: Tokenizer, run_config: dict[str, Any]) -> None:
    """The resolved config and a copy of the tokenizer, so a run directory is self-contained."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "config.json", run_config)
    (out_dir / TOKENIZER_DIR).mkdir(exist_ok=True)
    tokenizer.save(out_dir / TOKENIZER_DIR)


def apply_peft_spec(model: GPT, peft: dict[str, Any] | None) -> torch.nn.Module:
    """Apply {"method": name, **hyperparams} (or nothing) to a GPT; returns the model to train or load."""
    if not peft:
        return model
    from minillm.peft.apply import apply_peft

    return apply_peft(model, peft["method"], **{k: v for k, v in peft.items() if k != "method"})


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu",
             expect: GPTConfig | None = None) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """(model, tokenizer, run_config) of a finished run directory (config.json, ckpt.pt, tokenizer/).

    A PEFT run comes back wrapped the way it was trained (its config names the method)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run directory not found")
    state = safe_torch_load(run_dir / CKPT_NAME)
    if not isinstance(state, dict) or "model" not in state or "run_config" not in state:
        raise ValueError(f"{run_dir / CKPT_NAME}: not a minillm checkpoint (no 'model'/'run_config')")
    model_cfg = GPTConfig.from_dict(state["run_config"]["model"])
    if expect is not None:
        check_same_config(asdict(model_cfg), asdict(expect), str(run_dir / CKPT_NAME))
    tokenizer = Tokenizer.load(run_dir / TOKENIZER_DIR)
    if tokenizer.vocab_size != model_cfg.vocab_size:
        raise ValueError(f"{run_dir}: tokenizer has {tokenizer.vocab_size} tokens, the model {model_cfg.vocab_size}")
    model = apply_peft_spec(GPT(model_cfg), state["run_config"].get("peft"))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"{run_dir / CKPT_NAME}: weights do not fit the saved config ({e})") from e
    return model.to(pick_device(str(device)) if isinstance(device, str) else device).eval(), tokenizer, state["run_config"]
