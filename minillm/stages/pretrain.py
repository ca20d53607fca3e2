"""The pretraining stage: next-token prediction on the world corpus, from a fresh GPT.

    L(theta) = -(1/N) sum_t log p_theta(x_{t+1} | x_{<=t})        over the N tokens of the batch
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from minillm.config import TrainConfig
from minillm.datasets import random_windows, tokenize_corpus
from minillm.model import GPT, GPTConfig
from minillm.runs import Run, save_run_files
from minillm.tokenizer import Tokenizer
from minillm.train import LossFn, TrainResult, run_config_dict, train

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
    loss_fn: LossFn | None = None,
    extra_config: dict[str, Any] | None = None,
) -> tuple[GPT, TrainResult]:
    """Train a fresh GPT (vocab from the tokenizer) on train_path; writes a loadable run to out_dir.

    loss_fn defaults to `lm_loss` (next-token cross-entropy); distillation passes one that also asks a teacher
    (`minillm.stages.distill.student_base`), and records its settings in `extra_config`.
    """
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
                                 train_tokens=int(train_ids.numel()), **(extra_config or {}))
    save_run_files(out_dir, tokenizer, run_config, resume=resume)
    result = train(model, train_cfg, get_batch, loss_fn or lm_loss, out_dir, resume=resume, run_config=run_config,
                   desc="pretrain", progress=progress)
    return model, result




def run_pretrain(
    init: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    train_cfg: TrainConfig,
    method: GPTConfig,
    resume: bool = False,
    progress: bool = True,
) -> Run:
    """The stage in every stage's shape: `init` is the tokenizer directory (pretraining starts from no model),
    `data` the directory with corpus_train.txt and corpus_val.txt, `method` the network to train (its
    vocab_size is the tokenizer's)."""
    tokenizer = Tokenizer.load(init)
    data = Path(data)
    model, result = pretrain(tokenizer, data / "corpus_train.txt", data / "corpus_val.txt",
                             replace(method, vocab_size=tokenizer.vocab_size), train_cfg, out, resume, progress)
    return Run(Path(out), model.eval(), tokenizer, result, {"parameters": model.num_parameters()})
