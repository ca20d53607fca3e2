"""The SFT stage: supervised fine-tuning of a pretrained run on chats, optionally through a PEFT method.

The loss is `minillm.align.sft.sft_loss` (cross-entropy on the assistant tokens), the data
`minillm.align.chat`. A fine-tuned run directory looks like a pretraining one (config.json, ckpt.pt,
tokenizer/), plus `adapter.pt` (only the trainable PEFT tensors) when a PEFT method was used. Its config
records the PEFT method and hyperparameters, so `minillm.runs.load_run` rebuilds the same wrapped model.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from minillm.align.chat import all_tokens_mask, encode_chats, load_chats, pack, sample_batches
from minillm.align.sft import sft_loss
from minillm.config import SFTConfig, TrainConfig
from minillm.datasets import tokenize_corpus
from minillm.peft.apply import save_adapter
from minillm.peft.tokens import chat_token_ids
from minillm.runs import Run, apply_peft_spec, load_run, save_run_files
from minillm.train import run_config_dict, train


def pretraining_token_ids(base_cfg: dict[str, Any], tokenizer) -> set[int]:
    """The token ids that occur in the corpus the base run was pretrained on (empty if unknown)."""
    corpus = base_cfg.get("data", {}).get("train") if isinstance(base_cfg.get("data"), dict) else None
    if not corpus or not Path(corpus).exists():
        return set()
    return set(tokenize_corpus(corpus, tokenizer).unique().tolist())


def freeze_learned_embeddings(model: torch.nn.Module, learned_ids: set[int]) -> int:
    """Zero the gradient of the embedding rows of `learned_ids`; returns how many rows are frozen.

    Why: the embedding is tied to the output layer, so every SFT step pushes down the output row of every
    token that is not the target. The 40 training characters' names are targets; the held-out characters'
    names never are, so full fine-tuning teaches the model to stop saying them ("How old is Corin?" ->
    "Yorick is 74 years old.": the right fact, another name). Rows pretraining learned are kept as they are;
    rows it never trained (the chat tokens, words that only SFT uses, such as "sorry") still learn.
    With zero gradient AdamW leaves a row exactly unchanged as long as weight_decay is 0, as in every
    preset's SFT config (decoupled weight decay would still shrink the frozen rows).
    """
    wte = model.wte.weight
    keep = torch.ones(wte.shape[0], 1, dtype=wte.dtype, device=wte.device)
    frozen = [i for i in learned_ids if 0 <= i < wte.shape[0]]
    keep[frozen] = 0
    wte.register_hook(lambda grad: grad * keep)
    return len(frozen)


def run_sft(
    init: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    train_cfg: TrainConfig,
    method: SFTConfig | None = None,
    peft: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Run:
    """Supervised fine-tuning of the run in `init` on the chats in `data`; writes a run to `out`.

    method.loss_on="response" trains on the assistant tokens only (the chat template's loss mask);
    "all" is the masking ablation. method.limit keeps N random conversations (data-size experiments).
    A small validation split (method.val_fraction) is held out of the training file.
    method.embeddings (full fine-tuning only): "new" trains only the embedding rows of tokens the base
    model never saw in pretraining (see `freeze_learned_embeddings`), "all" trains the whole table.
    """
    method = method or SFTConfig()
    model, tok, base_cfg = load_run(init)
    block = model.config.block_size
    if peft and peft["method"] in ("prefix", "prompt"):
        block -= int(peft.get("num_virtual_tokens", 0))  # the virtual tokens take positions of the context
    chats = load_chats(data)
    if method.limit is not None:
        chats = random.Random(train_cfg.seed).sample(chats, min(method.limit, len(chats)))
    examples, dropped = encode_chats(tok, chats, block)
    if dropped:
        print(f"[sft] dropped {dropped} of {len(chats)} conversations longer than block_size + 1 = {block + 1} tokens")
    if method.loss_on == "all":
        examples = all_tokens_mask(examples)
    random.Random(train_cfg.seed).shuffle(examples)
    n_val = max(1, int(len(examples) * method.val_fraction)) if len(examples) > 20 else 0
    val, train_ex = examples[:n_val], examples[n_val:]
    n_train = len(train_ex)
    if method.packing:
        train_ex = pack(train_ex, block)
    train_get = sample_batches(train_ex, train_cfg.batch_size, tok.pad_id)
    val_get = sample_batches(val, train_cfg.batch_size, tok.pad_id) if val else None

    def get_batch(split: str, gen: torch.Generator):
        return train_get(split, gen) if split == "train" else val_get(split, gen)

    if peft and "trainable_token_indices" not in peft and peft["method"] not in ("last_k", "bitfit"):
        # The chat tokens never occurred in pretraining: a method that freezes the embeddings could not
        # learn to end an answer with <|end|> (lesson 7). Their few rows train with the adapter.
        peft = {**peft, "trainable_token_indices": chat_token_ids(tok)}
    model = apply_peft_spec(model, peft)
    n_frozen_rows = 0
    if not peft and method.embeddings == "new":
        n_frozen_rows = freeze_learned_embeddings(model, pretraining_token_ids(base_cfg, tok))
    # train_examples counts conversations; with packing, train_rows counts the packed rows they fill
    stats = {"conversations": len(chats), "dropped_too_long": dropped, "train_examples": n_train,
             "val_examples": len(val), "packing": method.packing, "loss_on": method.loss_on,
             "embeddings": method.embeddings, "frozen_embedding_rows": n_frozen_rows}
    if method.packing:
        stats["train_rows"] = len(train_ex)
    run_config = run_config_dict(stage="sft", model=base_cfg["model"], train=train_cfg, sft=method, peft=peft,
                                 init=str(init), data=str(data), stats=stats)
    out = Path(out)
    save_run_files(out, tok, run_config, resume=resume)
    result = train(model, train_cfg, get_batch, sft_loss, out, resume=resume, run_config=run_config,
                   desc="sft" if not peft else f"sft[{peft['method']}]", has_val=val_get is not None,
                   progress=progress)
    if peft:
        save_adapter(model, out / "adapter.pt")
    return Run(out, model.eval(), tok, result, stats)
