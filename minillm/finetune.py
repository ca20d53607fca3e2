"""Fine-tuning stages on top of a pretrained run: SFT, optionally through a PEFT method.

A fine-tuned run directory looks like a pretraining one (config.json, ckpt.pt, tokenizer/), plus
`adapter.pt` (only the trainable PEFT tensors) when a PEFT method was used. Its config records the
PEFT method and hyperparameters, so `minillm.pretrain.load_run` rebuilds the same wrapped model.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from minillm.align.sft import all_tokens_mask, encode_chats, load_chats, pack, sample_batches, sft_loss
from minillm.config import TrainConfig
from minillm.pretrain import apply_peft_spec, load_run, save_run_files
from minillm.train import TrainResult, run_config_dict, train


def run_sft(
    init: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    train_cfg: TrainConfig,
    peft: dict[str, Any] | None = None,
    packing: bool = False,
    loss_on: str = "response",
    limit: int | None = None,
    val_fraction: float = 0.05,
    resume: bool = False,
    progress: bool = True,
) -> tuple[torch.nn.Module, TrainResult, dict[str, Any]]:
    """Supervised fine-tuning of the run in `init` on the chats in `data`; writes a run to `out`.

    loss_on="response" trains on the assistant tokens only (the chat template's loss mask);
    loss_on="all" is the masking ablation. `limit` keeps only the first N conversations (data-size
    experiments). A small validation split (val_fraction) is held out of the training file.
    """
    if loss_on not in ("response", "all"):
        raise ValueError(f"loss_on must be 'response' or 'all', got {loss_on!r}")
    model, tok, base_cfg = load_run(init)
    block = model.config.block_size
    chats = load_chats(data)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        chats = random.Random(train_cfg.seed).sample(chats, min(limit, len(chats)))
    examples, dropped = encode_chats(tok, chats, block)
    if dropped:
        print(f"[sft] dropped {dropped} of {len(chats)} conversations longer than block_size + 1 = {block + 1} tokens")
    if loss_on == "all":
        examples = all_tokens_mask(examples)
    random.Random(train_cfg.seed).shuffle(examples)
    n_val = max(1, int(len(examples) * val_fraction)) if len(examples) > 20 else 0
    val, train_ex = examples[:n_val], examples[n_val:]
    n_train = len(train_ex)
    if packing:
        train_ex = pack(train_ex, block)
    train_get = sample_batches(train_ex, train_cfg.batch_size, tok.pad_id)
    val_get = sample_batches(val, train_cfg.batch_size, tok.pad_id) if val else None

    def get_batch(split: str, gen: torch.Generator):
        return train_get(split, gen) if split == "train" else val_get(split, gen)

    model = apply_peft_spec(model, peft)
    # train_examples counts conversations; with packing, train_rows counts the packed rows they fill
    stats = {"conversations": len(chats), "dropped_too_long": dropped, "train_examples": n_train,
             "val_examples": len(val), "packing": packing, "loss_on": loss_on}
    if packing:
        stats["train_rows"] = len(train_ex)
    run_config = run_config_dict(stage="sft", model=base_cfg["model"], train=train_cfg, peft=peft,
                                 init=str(init), data=str(data), stats=stats)
    out = Path(out)
    save_run_files(out, tok, run_config)
    result = train(model, train_cfg, get_batch, sft_loss, out, resume=resume, run_config=run_config,
                   desc="sft" if not peft else f"sft[{peft['method']}]", has_val=val_get is not None,
                   progress=progress)
    if peft:
        from minillm.peft.apply import save_adapter

        save_adapter(model, out / "adapter.pt")
    return model.eval(), result, stats
