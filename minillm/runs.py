"""The run store: where every checkpoint, adapter and run config is read or written.

A run directory is self-contained:

    config.json     the resolved run config (stage, model shape, train config, method knobs, peft spec, stats)
    ckpt.pt         weights, optimizer moments, step and RNG states (`minillm.train.save_training_state`)
    tokenizer/      a copy of the tokenizer the run was trained with
    adapter.pt      only the trainable PEFT tensors, when a PEFT method was used
    metrics.jsonl, loss_curve.png, eval.json ...   what the stage measured

Stages write runs with `save_run_files` (+ the training loop's checkpoint) and read them with `load_run`,
`load_plain_run` (PEFT merged into a plain GPT) or `load_reward_model`; nothing else opens a checkpoint.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from minillm.align.reward import RewardModel
from minillm.model import GPT, GPTConfig
from minillm.peft.apply import apply_peft, merge_peft
from minillm.tokenizer import Tokenizer
from minillm.train import CKPT_NAME, TrainResult, check_same_config, model_config_with_defaults
from minillm.utils import pick_device, safe_torch_load, write_json

TOKENIZER_DIR = "tokenizer"


@dataclass
class Run:
    """What a stage returns: the trained model (in eval mode), where it was written, and what was measured."""

    out: Path
    model: nn.Module
    tokenizer: Tokenizer
    result: TrainResult
    stats: dict[str, Any] = field(default_factory=dict)


def save_run_files(out_dir: Path, tokenizer: Tokenizer, run_config: dict[str, Any], resume: bool = False) -> None:
    """The resolved config and a copy of the tokenizer, so a run directory is self-contained.

    With `resume`, the run already in out_dir is checked first (a checkpoint to continue, written for the same
    network): a refused resume leaves its files as they were."""
    if resume:
        check_resumable(out_dir, run_config)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "config.json", run_config)
    (out_dir / TOKENIZER_DIR).mkdir(exist_ok=True)
    tokenizer.save(out_dir / TOKENIZER_DIR)


def check_resumable(out_dir: str | os.PathLike, run_config: dict[str, Any]) -> None:
    """--resume needs a checkpoint in out_dir, and the run's config.json must name the same network."""
    out_dir = Path(out_dir)
    if not (out_dir / CKPT_NAME).exists():
        raise FileNotFoundError(f"--resume: {out_dir / CKPT_NAME} not found (nothing to continue)")
    cfg_file = out_dir / "config.json"
    if cfg_file.exists() and run_config.get("model") is not None:
        saved = json.loads(cfg_file.read_text()).get("model") or {}
        check_same_config(model_config_with_defaults(saved), model_config_with_defaults(run_config["model"]),
                          str(out_dir / CKPT_NAME))


def apply_peft_spec(model: GPT, peft: dict[str, Any] | None) -> nn.Module:
    """Apply {"method": name, **hyperparams} (or nothing) to a GPT; returns the model to train or load."""
    if not peft:
        return model
    return apply_peft(model, peft["method"], **{k: v for k, v in peft.items() if k != "method"})


def checkpoint_step(out_dir: str | os.PathLike) -> int:
    """The optimiser step saved in out_dir/ckpt.pt (0 when there is none yet)."""
    path = Path(out_dir) / CKPT_NAME
    return int(safe_torch_load(path)["step"]) if path.exists() else 0


def _device(device: str | torch.device) -> torch.device:
    return pick_device(device) if isinstance(device, str) else device


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
    return model.to(_device(device)).eval(), tokenizer, state["run_config"]


def load_plain_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu"
                   ) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """(GPT, tokenizer, run_config) of a run, with a PEFT run's adapters merged into a plain GPT.

    The reward model and DPO start from the SFT policy; if SFT trained LoRA (or VeRA, KronA), W + BA is
    folded into W so the next stage starts from exactly the same function with ordinary weights.
    """
    model, tok, cfg = load_run(run_dir, device=device)
    if cfg.get("peft"):
        try:
            model = merge_peft(model)
        except ValueError as e:
            raise ValueError(f"{run_dir}: a {cfg['peft']['method']} run cannot be merged into a plain GPT ({e})") from e
    return model, tok, cfg


def load_reward_model(run_dir: str | os.PathLike, device: str | torch.device = "cpu"
                      ) -> tuple[RewardModel, Tokenizer, dict[str, Any]]:
    """(reward model, tokenizer, run_config) of a reward run; run_config["reward_offset"] normalises it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run directory not found")
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path}: file not found")
    run_config = json.loads(cfg_path.read_text())
    if run_config.get("stage") != "reward":
        raise ValueError(f"{cfg_path}: not a reward-model run (stage {run_config.get('stage')!r})")
    state = safe_torch_load(run_dir / CKPT_NAME)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{run_dir / CKPT_NAME}: not a minillm checkpoint (no 'model')")
    rm = RewardModel(GPT(GPTConfig.from_dict(run_config["model"])),
                     loglik=bool((run_config.get("reward") or {}).get("loglik", False)))
    try:
        rm.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"{run_dir / CKPT_NAME}: weights do not fit the saved config ({e})") from e
    tok = Tokenizer.load(run_dir / TOKENIZER_DIR)
    return rm.to(_device(device)).eval(), tok, run_config
