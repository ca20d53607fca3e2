"""The distillation stage: a small student fine-tuned on chats with a big teacher's help (lesson 10).

Four modes, the same loop, the same number of steps and chats per step (the same token budget):

    sft        loss = CE(student, chat answers)                              the baseline: no teacher
    word       loss = alpha * kd(student, teacher) + (1 - alpha) * CE        word-level KD (Hinton et al. 2015)
    seq        loss = CE(student, teacher's greedy answers)                  sequence-level KD (Kim & Rush 2016)
    on_policy  with probability lmbda the batch is the student's own samples, scored by kd alone;
               otherwise a chat batch with the word-level loss                on-policy KD (GKD, Agarwal et al. 2024)

kd is `minillm.align.distill.kd_loss` over the answer tokens. The student starts from a pretrained run of its own
shape (same tokenizer as the teacher); `student_base` pretrains one on the teacher's pretraining corpus.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minillm.align.chat import (
    SFTExample,
    collate,
    encode_chats,
    load_chats,
    sample_batches,
)
from minillm.align.distill import kd_loss
from minillm.align.sft import masked_cross_entropy_sum
from minillm.config import DISTILL_MODES, DistillConfig, TrainConfig, get_preset
from minillm.eval.task import evaluate_instructions, fact_completion_accuracy
from minillm.runs import Run, load_plain_run, save_run_files
from minillm.sampling import generate_completions
from minillm.stages.pretrain import pretrain
from minillm.stages.sft import freeze_learned_embeddings, pretraining_token_ids
from minillm.tokenizer import Tokenizer
from minillm.train import run_config_dict, train
from minillm.utils import pick_device


def check_same_tokenizer(teacher: Tokenizer, student: Tokenizer, teacher_dir: Any, student_dir: Any) -> None:
    """Word-level distillation compares distributions token by token: both models must share one vocabulary."""
    if teacher.vocab != student.vocab or teacher.special_tokens != student.special_tokens:
        raise ValueError(f"distill: the student in {student_dir} ({student.vocab_size} tokens) and the teacher in "
                         f"{teacher_dir} ({teacher.vocab_size} tokens) have different tokenizers; distillation "
                         "needs one vocabulary (pretrain the student with the teacher's tokenizer: --student-preset)")


def pretraining_run(run_dir: str | os.PathLike) -> Path:
    """The pretraining run at the root of `run_dir`'s lineage (following each run's `init`: dpo -> sft -> base)."""
    seen = Path(run_dir)
    for _ in range(16):  # a lineage is a few runs long
        cfg_path = seen / "config.json"
        if not cfg_path.exists():
            raise FileNotFoundError(f"{cfg_path}: not found (needed to find the teacher's pretraining run; run from "
                                    "the folder the teacher was trained in, or give --student)")
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("stage") == "pretrain" and isinstance(cfg.get("data"), dict):
            return seen
        if not cfg.get("init"):
            break
        seen = _init_dir(seen, cfg["init"])
    raise ValueError(f"distill: cannot find the pretraining corpus of {run_dir} (no pretraining run in its "
                     "lineage); give a pretrained student with --student")


def _init_dir(run_dir: Path, init: str) -> Path:
    """A run's `init` as recorded (relative to where that command ran), or else the sibling folder of that name
    (the pipeline's layout: base/, sft/, dpo/ side by side), so a moved or copied pipeline folder still works."""
    recorded = Path(init)
    if recorded.exists() or recorded.is_absolute():
        return recorded
    sibling = run_dir.parent / recorded.name
    return sibling if sibling.exists() else recorded


def pretraining_corpus(run_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(corpus_train, corpus_val) of the pretraining run of `run_dir`'s lineage."""
    data = json.loads((pretraining_run(run_dir) / "config.json").read_text())["data"]
    return Path(data["train"]), Path(data["val"])


# Word-level KD while the student pretrains: the teacher's base model scores every position of the corpus
# (alpha 1 and T = 1: the soft targets alone, as measured best in lesson 10's notebook).
PRETRAIN_KD = DistillConfig(mode="word", alpha=1.0, temperature=1.0)


def student_base(teacher: str | os.PathLike, preset: str, out: str | os.PathLike,
                 train_cfg: TrainConfig | None = None, progress: bool = True, kd: DistillConfig | None = None) -> Run:
    """Pretrain a student of `preset`'s network on the teacher's pretraining corpus with the teacher's tokenizer.

    Same corpus and tokenizer as the teacher's base model; only the network is smaller. train_cfg defaults to the
    preset's pretraining config. kd (e.g. `PRETRAIN_KD`): pretrain with `distill_loss` against the pretraining run
    of the teacher's lineage instead of cross-entropy alone (word-level KD on every corpus position).
    """
    base = pretraining_run(teacher)
    train_path, val_path = pretraining_corpus(teacher)
    p = get_preset(preset)
    tok = Tokenizer.load(Path(teacher) / "tokenizer")
    train_cfg = train_cfg or p.pretrain
    loss_fn, extra = None, {}
    if kd is not None:
        teacher_model, teacher_tok, _ = load_plain_run(base, device=pick_device(train_cfg.device))
        check_same_tokenizer(teacher_tok, tok, base, teacher)
        loss_fn = distill_loss(teacher_model.requires_grad_(False).eval(), kd)
        extra = {"distill": asdict(kd), "teacher": str(base)}
    model, result = pretrain(tok, train_path, val_path, replace(p.model, vocab_size=tok.vocab_size), train_cfg, out,
                             progress=progress, loss_fn=loss_fn, extra_config=extra)
    return Run(Path(out), model.eval(), tok, result, {"parameters": model.num_parameters()})


def teacher_answers(teacher: nn.Module, tok: Tokenizer, chats: list[list[dict[str, str]]], max_new_tokens: int,
                    batch_size: int = 64) -> list[list[dict[str, str]]]:
    """Sequence-level KD's data: each chat with its last assistant turn replaced by the teacher's greedy answer."""
    prompts = [tok.apply_chat_template(chat[:-1], add_generation_prompt=True)[0] for chat in chats]
    outs = generate_completions(teacher, prompts, max_new_tokens, eos_id=tok.end_id, temperature=0,
                                batch_size=batch_size)
    # An empty answer cannot be a chat turn: that chat keeps its own answer (counted by the caller's stats).
    return [chat[:-1] + [{"role": "assistant", "content": tok.decode(y)}] if tok.decode(y).strip() else chat
            for chat, y in zip(chats, outs)]


def distill_loss(teacher: nn.Module, method: DistillConfig):
    """loss_fn(student, batch) -> (loss_sum, n_answer_tokens) for `minillm.train`.

        per batch:  alpha * kd + (1 - alpha) * CE      (mode sft: alpha = 0; a student-sampled batch: alpha = 1)

    The loop divides sums by the token count, so the kd mean is turned back into a sum (kd * n).
    """
    alpha = 0.0 if method.mode in ("sft", "seq") else method.alpha

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
        ce_sum, n = masked_cross_entropy_sum(logits, batch["targets"])
        a = 1.0 if bool(batch.get("sampled", torch.tensor(False))) else alpha
        if a == 0.0:
            return ce_sum, n
        with torch.no_grad():
            teacher_logits = teacher(batch["input_ids"], attention_mask=batch.get("attention_mask"))
        kd = kd_loss(logits, teacher_logits, batch["targets"] != -100, method.temperature, method.kind, method.beta)
        return a * kd * n + (1.0 - a) * ce_sum, n

    return loss_fn


class OnPolicyDistillSource:
    """GKD's batch source: with probability lmbda the student answers the prompts itself (temperature
    sample_temperature) and the batch is those answers (scored by kd alone), otherwise a batch of the chats."""

    def __init__(self, examples: list[SFTExample], prompts: list[list[int]], tok: Tokenizer, batch_size: int,
                 method: DistillConfig) -> None:
        self.chat_batches = sample_batches(examples, batch_size, tok.pad_id)
        self.prompts, self.tok, self.batch_size, self.method = prompts, tok, batch_size, method
        self.sampled_batches = 0

    def __call__(self, split: str, gen: torch.Generator, model: nn.Module, step: int) -> dict[str, torch.Tensor]:
        if float(torch.rand((), generator=gen)) >= self.method.lmbda:
            return self.chat_batches(split, gen)
        self.sampled_batches += 1
        idx = torch.randint(0, len(self.prompts), (self.batch_size,), generator=gen).tolist()
        prompts = [self.prompts[i] for i in idx]
        device = next(model.parameters()).device
        sample_gen = torch.Generator(device=device).manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
        was_training = model.training
        with torch.no_grad():
            outs = generate_completions(model, prompts, self.method.max_new_tokens, eos_id=self.tok.end_id,
                                        temperature=self.method.sample_temperature, generator=sample_gen)
        model.train(was_training)
        # the student's answer (and its <|end|> when it stopped) is what the teacher scores
        examples = [SFTExample(p + y + [self.tok.end_id], [0] * len(p) + [1] * (len(y) + 1)) for p, y in
                    zip(prompts, outs)]
        return {**collate(examples, self.tok.pad_id), "sampled": torch.tensor(True)}


def run_distill(
    teacher: str | os.PathLike,
    student: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    train_cfg: TrainConfig,
    method: DistillConfig | None = None,
    progress: bool = True,
) -> Run:
    """Fine-tune the pretrained `student` run on the chats in `data` with `method.mode`'s use of the `teacher` run.

    Writes a run to `out` (config.json, ckpt.pt, tokenizer/) that `load_run` reads like an SFT run. As in SFT, the
    embedding rows pretraining learned stay frozen (`freeze_learned_embeddings`), so every mode is compared with
    the same SFT recipe.
    """
    method = method or DistillConfig()
    device = pick_device(train_cfg.device)
    teacher_model, teacher_tok, _ = load_plain_run(teacher, device=device)
    model, tok, student_cfg = load_plain_run(student)
    check_same_tokenizer(teacher_tok, tok, teacher, student)
    teacher_model.requires_grad_(False).eval()
    block = model.config.block_size
    chats = load_chats(data)
    differ = None
    if method.mode == "seq":
        references = chats
        chats = teacher_answers(teacher_model, tok, chats, method.max_new_tokens)
        # a teacher that reproduces its own training answers gives sequence-level KD nothing new to teach
        differ = sum(a[-1]["content"] != b[-1]["content"] for a, b in zip(chats, references))
    examples, dropped = encode_chats(tok, chats, block)
    random.Random(train_cfg.seed).shuffle(examples)
    n_val = max(1, len(examples) // 20) if len(examples) > 20 else 0
    val, train_ex = examples[:n_val], examples[n_val:]
    if not train_ex:
        raise ValueError(f"distill: no chat of {data} fits the student's context of block_size + 1 = {block + 1} "
                         f"tokens ({dropped} of {len(chats)} dropped as too long"
                         f"{'; seq mode: the teacher answers with up to max_new_tokens tokens' if differ else ''})")
    val_get = sample_batches(val, train_cfg.batch_size, tok.pad_id) if val else None
    if method.mode == "on_policy":
        prompts = [tok.apply_chat_template(c[:-1], add_generation_prompt=True)[0] for c in chats]
        prompts = [p for p in prompts if len(p) + method.max_new_tokens + 1 <= block]
        source = OnPolicyDistillSource(train_ex, prompts, tok, train_cfg.batch_size, method)
    else:
        train_get = sample_batches(train_ex, train_cfg.batch_size, tok.pad_id)

    def get_batch(split: str, gen: torch.Generator, model: nn.Module, step: int) -> dict[str, torch.Tensor]:
        if split != "train":
            return val_get(split, gen)
        return source(split, gen, model, step) if method.mode == "on_policy" else train_get(split, gen)

    n_frozen = freeze_learned_embeddings(model, pretraining_token_ids(student_cfg, tok))
    stats = {"conversations": len(chats), "dropped_too_long": dropped, "train_examples": len(train_ex),
             "val_examples": len(val), "frozen_embedding_rows": n_frozen,
             "teacher_parameters": _parameters(teacher_model), "student_parameters": _parameters(model)}
    run_config = run_config_dict(stage="distill", model=student_cfg["model"], train=train_cfg, distill=method,
                                 init=str(student), teacher=str(teacher), data=str(data), stats=stats)
    out = Path(out)
    save_run_files(out, tok, run_config)
    result = train(model, train_cfg, get_batch, distill_loss(teacher_model, method), out, run_config=run_config,
                   desc=f"distill[{method.mode}]", has_val=val_get is not None, progress=progress, on_policy=True)
    if method.mode == "on_policy":
        stats["sampled_batches"] = source.sampled_batches
    if differ is not None:
        stats["teacher_answers_differ"] = differ
    return Run(out, model.eval(), tok, result, stats)


def _parameters(model: nn.Module) -> int:
    """Distinct parameters (the tied embedding counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())



# ----------------------------------------------------------------------------- the lesson-10 experiment
@torch.no_grad()
def response_loss(model: nn.Module, tok: Tokenizer, chats: list[list[dict[str, str]]], batch_size: int = 64) -> float:
    """Mean cross-entropy per answer token of `chats` (the held-out chats' validation loss)."""
    examples, _ = encode_chats(tok, chats, model.config.block_size)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], tok.pad_id)
        logits = model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        loss_sum, n = masked_cross_entropy_sum(logits, batch["targets"].to(device))
        total, count = total + float(loss_sum), count + int(n)
    return total / max(count, 1)


def chat_model_row(name: str, model: nn.Module, tok: Tokenizer, test: list[dict[str, Any]],
                   probes: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of one chat model: parameters, held-out answer loss, fact completion, exact match, gold."""
    heldout = evaluate_instructions(model, tok, test)
    return {"model": name, "parameters": _parameters(model),
            "val_loss": response_loss(model, tok, [r["messages"] for r in test]),
            "fact_completion": fact_completion_accuracy(model, tok, probes)["accuracy"],
            "exact_match": heldout["exact_match"], "gold_reward": heldout["gold_reward"],
            "gold_rewards": [r["gold_reward"] for r in heldout["rows"]]}


def distill_experiment(teacher: str | os.PathLike, student: str | os.PathLike, data: str | os.PathLike,
                       test: list[dict[str, Any]], probes: list[dict[str, Any]], out: str | os.PathLike,
                       train_cfg: TrainConfig, method: DistillConfig | None = None,
                       modes: tuple[str, ...] = DISTILL_MODES, progress: bool = False,
                       kd_student: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The same student, the same steps and batch size, trained in each mode; one row per model, the teacher first.

    test: sft_test rows (held-out characters), probes: the world's fact probes. Runs go to out/<mode>.
    kd_student: a student base pretrained with KD (`student_base(..., kd=PRETRAIN_KD)`): one more row, that base
    fine-tuned in mode sft (out/kd_pretrain_sft), to compare distillation during pretraining with distillation
    during fine-tuning.
    """
    method = method or DistillConfig()
    device = pick_device(train_cfg.device)
    teacher_model, tok, _ = load_plain_run(teacher, device=device)
    rows = [chat_model_row("teacher", teacher_model, tok, test, probes)]
    runs = [(f"student: {mode}", student, mode, Path(out) / mode) for mode in modes]
    if kd_student is not None:
        runs.append(("student pretrained with KD: sft", kd_student, "sft", Path(out) / "kd_pretrain_sft"))
    for name, base, mode, run_dir in runs:
        run = run_distill(teacher, base, data, run_dir, train_cfg, replace(method, mode=mode), progress=progress)
        rows.append({**chat_model_row(name, run.model.to(device), tok, test, probes),
                     "seconds": run.result.seconds, **{k: v for k, v in run.stats.items()
                                                       if k in ("teacher_answers_differ", "sampled_batches")}})
    return rows
