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


def pretraining_token_ids(base_cfg: dict[str, Any], tokenizer) -> set[int]:
    """The token ids that occur in the corpus the base run was pretrained on (empty if unknown)."""
    from minillm.datasets import tokenize_corpus

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
    peft: dict[str, Any] | None = None,
    packing: bool = False,
    loss_on: str = "response",
    limit: int | None = None,
    val_fraction: float = 0.05,
    embeddings: str = "new",
    resume: bool = False,
    progress: bool = True,
) -> tuple[torch.nn.Module, TrainResult, dict[str, Any]]:
    """Supervised fine-tuning of the run in `init` on the chats in `data`; writes a run to `out`.

    loss_on="response" trains on the assistant tokens only (the chat template's loss mask);
    loss_on="all" is the masking ablation. `limit` keeps only the first N conversations (data-size
    experiments). A small validation split (val_fraction) is held out of the training file.
    embeddings (full fine-tuning only): "new" trains only the embedding rows of tokens the base model
    never saw in pretraining (see `freeze_learned_embeddings`), "all" trains the whole table.
    """
    if embeddings not in ("new", "all"):
        raise ValueError(f"embeddings must be 'new' or 'all', got {embeddings!r}")
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

    if peft and "trainable_token_indices" not in peft and peft["method"] not in ("last_k", "bitfit"):
        # The chat tokens never occurred in pretraining: a method that freezes the embeddings could not
        # learn to end an answer with <|end|> (lesson 7). Their few rows train with the adapter.
        from minillm.peft.tokens import chat_token_ids

        peft = {**peft, "trainable_token_indices": chat_token_ids(tok)}
    model = apply_peft_spec(model, peft)
    n_frozen_rows = 0
    if not peft and embeddings == "new":
        n_frozen_rows = freeze_learned_embeddings(model, pretraining_token_ids(base_cfg, tok))
    # train_examples counts conversations; with packing, train_rows counts the packed rows they fill
    stats = {"conversations": len(chats), "dropped_too_long": dropped, "train_examples": n_train,
             "val_examples": len(val), "packing": packing, "loss_on": loss_on, "embeddings": embeddings,
             "frozen_embedding_rows": n_frozen_rows}
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
