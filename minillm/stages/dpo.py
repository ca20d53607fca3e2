"""The DPO stage: train the SFT policy directly on preference pairs (Rafailov et al., 2023).

RLHF maximises reward while staying close to the reference policy pi_ref (the SFT model):

    max_pi  E_{x, y ~ pi} [ r(x, y) ] - beta KL( pi(.|x) || pi_ref(.|x) )
    =>      pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x)                              (closed form)
    <=>     r(x, y) = beta log pi*(y|x) / pi_ref(y|x) + beta log Z(x)

Put that reward into the Bradley-Terry likelihood: Z(x) cancels in r_w - r_l, leaving a loss on the policy alone,

    L_DPO = -log sigma( beta [log pi(y_w|x) - log pi_ref(y_w|x)] - beta [log pi(y_l|x) - log pi_ref(y_l|x)] )

(`minillm.align.dpo.dpo_loss`, with its variants: cDPO, robust, hinge, IPO). This module wires it:
log pi(y|x) is `sequence_logprobs` over the response tokens, chosen and rejected in one concatenated batch;
the reference is a frozen copy of the SFT model or, with a PEFT method, the same model with its adapters
disabled (`minillm.peft.apply.disable_adapters`); reference log-probs are computed once per pair before
training (TRL's `precompute_ref_log_probs`, on by default here), since pi_ref never changes.
Metrics are TRL's (`dpo_metrics`: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
logps/chosen, logps/rejected), averaged per logging window into metrics.jsonl.

A DPO run directory is a normal run (config.json, ckpt.pt, tokenizer/, adapter.pt with PEFT), loadable with
`minillm.runs.load_run`, plus eval.json when a held-out preference file was given.
"""
from __future__ import annotations

import copy
import os
from dataclasses import asdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from minillm.align.dpo import dpo_loss, dpo_metrics
from minillm.align.logprobs import sequence_logprobs
from minillm.align.preferences import (
    BatchMetricLog, EncodedPair, PreferencePair, collate_pairs, disable_dropout, encode_pair, pair_batches,
    prepare_pairs, read_preferences,
)
from minillm.config import DPOConfig, TrainConfig
from minillm.peft.apply import disable_adapters, save_adapter
from minillm.runs import Run, apply_peft_spec, checkpoint_step, load_plain_run, save_run_files
from minillm.sampling import generate_completions
from minillm.train import run_config_dict, train
from minillm.utils import autocast_dtype, pick_device, write_json
from minillm.world import gold_reward

__all__ = [
    "concatenated_logps", "reference_logps", "precompute_reference_logps", "response_lengths", "dpo_loss_fn",
    "evaluate_dpo", "reward_and_kl", "run_dpo",
]


# ------------------------------------------------------------------------------------ log-probs
def concatenated_logps(model: nn.Module, batch: dict[str, torch.Tensor], average: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(y_w|x), log pi(y_l|x)), each (B,), from ONE forward pass over the 2B rows [chosen; rejected].

    Summed over response tokens (average=False, DPO) or their per-token mean (average=True, IPO in TRL).
    """
    logps = sequence_logprobs(model, batch["input_ids"], batch["loss_mask"], batch["attention_mask"],
                              average=average)  # (2B,)
    return logps.chunk(2)


@torch.no_grad()
def reference_logps(model: nn.Module, reference: nn.Module | None, batch: dict[str, torch.Tensor],
                    average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi_ref(y_w|x), log pi_ref(y_l|x)) without gradient; reference=None means `model` with adapters off."""
    if reference is not None:
        return concatenated_logps(reference, batch, average)
    with disable_adapters(model):
        return concatenated_logps(model, batch, average)


@torch.no_grad()
def precompute_reference_logps(model: nn.Module, reference: nn.Module | None, pairs: list[EncodedPair], pad_id: int,
                               average: bool = False, batch_size: int = 32, amp_dtype: torch.dtype | None = None
                               ) -> torch.Tensor:
    """log pi_ref of every pair once, before training: a (N, 2) fp32 CPU table, column 0 chosen, 1 rejected.

    amp_dtype: the autocast dtype training will use, so the reference is computed at the same precision.
    """
    net = reference if reference is not None else model
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    out = []
    for start in range(0, len(pairs), batch_size):
        batch = {k: v.to(device) for k, v in collate_pairs(pairs[start:start + batch_size], pad_id).items()}
        ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
        with ctx:
            c, r = reference_logps(model, reference, batch, average)
        out.append(torch.stack([c, r], dim=1).float().cpu())  # (b, 2)
    net.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 2)


def _with_reference(get_batch: Callable, table: torch.Tensor) -> Callable:
    """Add the precomputed reference log-probs of the drawn pairs to each batch, as "ref_logps" (2B,)."""

    def get(split: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
        batch = get_batch(split, gen)
        idx = batch["index"]  # (B,)
        batch["ref_logps"] = torch.cat([table[idx, 0], table[idx, 1]])  # (2B,) [chosen; rejected]
        return batch

    return get


# ------------------------------------------------------------------------------------ the loss
def response_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scored response tokens of each of the 2B rows, (2B,): the mask of the predicted tokens, as in
    `sequence_logprobs` (column 0 has no prefix and is never scored)."""
    m = batch["loss_mask"][:, 1:] != 0
    if "attention_mask" in batch:
        m = m & (batch["attention_mask"][:, 1:] != 0)
    return m.sum(dim=-1)


def dpo_loss_fn(reference: nn.Module | None, beta: float = 0.1, loss_type: str = "sigmoid",
                label_smoothing: float = 0.0, average: bool = False, rpo_alpha: float | None = None,
                log: BatchMetricLog | None = None):
    """loss_fn(model, batch) -> (sum of per-pair DPO losses, B) for `minillm.train`.

    The reference log-probs come from batch["ref_logps"] when precomputed, else from `reference`
    (None: the model with its adapters disabled), under no_grad either way. With rpo_alpha, each pair's
    loss also gets the chosen answer's per-token negative log-likelihood (RPO, Pang et al., 2024):

        loss_i = DPO_i + rpo_alpha * ( -log pi(y_w,i | x_i) / |y_w,i| )

    which keeps the chosen answers likely while their margin over the rejected ones grows (TRL's
    `rpo_alpha` adds the same term as a token mean over the batch's chosen answers).
    """

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        pi_w, pi_l = concatenated_logps(model, batch, average)  # (B,), (B,)
        if "ref_logps" in batch:
            ref_w, ref_l = batch["ref_logps"].to(pi_w.dtype).chunk(2)
        else:
            ref_w, ref_l = reference_logps(model, reference, batch, average)
        losses, r_w, r_l = dpo_loss(pi_w, pi_l, ref_w.to(pi_w.dtype), ref_l.to(pi_w.dtype), beta=beta,
                                    loss_type=loss_type, label_smoothing=label_smoothing)
        metrics = dpo_metrics(r_w, r_l, pi_w, pi_l)
        if rpo_alpha is not None:
            n_w = response_lengths(batch)[: pi_w.shape[0]].to(pi_w.dtype)  # (B,)
            nll = -(pi_w if average else pi_w / n_w)  # (B,) per-token NLL of each chosen answer
            losses = losses + rpo_alpha * nll
            metrics["nll_loss"] = nll.detach().float().mean().item()
        if log is not None:
            log.record(model.training, metrics)
        return losses.sum(), losses.shape[0]

    return loss_fn


# ------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate_dpo(policy: nn.Module, reference: nn.Module | None, tokenizer, pairs: list[PreferencePair],
                 beta: float = 0.1, average: bool = False, batch_size: int = 32,
                 block_size: int | None = None) -> dict[str, Any]:
    """Implicit-reward accuracy on pairs: mean[r_w > r_l] with r = beta (log pi(y|x) - log pi_ref(y|x)),
    overall and per `rejected_kind`, with the mean rewards, margin and log-probs (TRL's names).

    Pairs longer than block_size (default: the policy's context) are left out."""
    block = block_size or getattr(getattr(policy, "config", None), "block_size", None)
    kept, encoded = [], []
    for p in pairs:
        e = encode_pair(tokenizer, p)
        if block is None or max(len(e.chosen_ids), len(e.rejected_ids)) <= block:
            kept.append(p)
            encoded.append(e)
    if not encoded:
        raise ValueError("evaluate_dpo: every pair is longer than the context")
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    pi, ref = [], []
    for start in range(0, len(encoded), batch_size):
        batch = {k: v.to(device) for k, v in collate_pairs(encoded[start:start + batch_size], tokenizer.pad_id).items()}
        pi.append(torch.stack(concatenated_logps(policy, batch, average), dim=1).float().cpu())  # (b, 2)
        ref.append(torch.stack(reference_logps(policy, reference, batch, average), dim=1).float().cpu())
    policy.train(was_training)
    pi_t, ref_t = torch.cat(pi), torch.cat(ref)  # (N, 2)
    r_w, r_l = beta * (pi_t[:, 0] - ref_t[:, 0]), beta * (pi_t[:, 1] - ref_t[:, 1])  # (N,)
    by_kind: dict[str, list[bool]] = {}
    for p, correct in zip(kept, (r_w > r_l).tolist()):
        by_kind.setdefault(str(p.meta.get("rejected_kind", "all")), []).append(correct)
    return {
        "n": len(encoded),
        **dpo_metrics(r_w, r_l, pi_t[:, 0], pi_t[:, 1]),
        "per_kind_accuracy": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
    }


@torch.no_grad()
def reward_and_kl(policy: nn.Module, reference: nn.Module | None, tokenizer, prompts: list[str],
                  n_samples: int = 1, temperature: float = 1.0, max_new_tokens: int = 48, seed: int = 0,
                  reward_fn: Callable[[str, str], float] | None = None) -> dict[str, float]:
    """Monte-Carlo estimates over y ~ pi(.|x) (temperature 1 samples pi exactly):

        KL(pi || pi_ref) = E_y [ log pi(y|x) - log pi_ref(y|x) ]   (sequence level; Schulman's k1 estimator)
        reward           = E_y [ reward_fn(x, y) ]                  (default: the world's gold reward)

    y includes the closing <|end|> when the policy emitted it within max_new_tokens. Returns
    {"kl", "reward", "rewards" (one per sample), "response_tokens", "n"}; the pair (kl, reward) is one point of
    the DPO paper's frontier.
    """
    reward_fn = reward_fn or gold_reward
    device = next(policy.parameters()).device
    xs = [x for x in prompts for _ in range(n_samples)]
    prompt_ids = [tokenizer.apply_chat_template([{"role": "user", "content": x}], add_generation_prompt=True)[0]
                  for x in xs]
    gen = torch.Generator(device=device).manual_seed(seed)
    outs = generate_completions(policy, prompt_ids, max_new_tokens, eos_id=tokenizer.end_id,
                                temperature=temperature, generator=gen)
    block = policy.config.block_size if hasattr(policy, "config") else 10**9
    seqs, masks, rewards, lengths = [], [], [], []
    for x, p, y in zip(xs, prompt_ids, outs):
        y_scored = y + [tokenizer.end_id] if len(y) < max_new_tokens else y  # it stopped: <|end|> was sampled
        if not y_scored or len(p) + len(y_scored) > block:
            continue
        seqs.append(p + y_scored)
        masks.append([0] * len(p) + [1] * len(y_scored))
        rewards.append(reward_fn(x, tokenizer.decode(y)))
        lengths.append(len(y_scored))
    if not seqs:
        raise ValueError("reward_and_kl: no sample fits the context")
    kl = []
    was_training = policy.training
    policy.eval()
    for start in range(0, len(seqs), 64):
        chunk_s, chunk_m = seqs[start:start + 64], masks[start:start + 64]
        T = max(len(s) for s in chunk_s)
        ids = torch.full((len(chunk_s), T), tokenizer.pad_id, dtype=torch.long)  # (b, T), right-padded
        attn = torch.zeros_like(ids)
        loss_mask = torch.zeros_like(ids)
        for i, (s, m) in enumerate(zip(chunk_s, chunk_m)):
            ids[i, : len(s)], attn[i, : len(s)], loss_mask[i, : len(s)] = torch.tensor(s), 1, torch.tensor(m)
        batch = {"input_ids": ids.to(device), "attention_mask": attn.to(device), "loss_mask": loss_mask.to(device)}
        pi = sequence_logprobs(policy, batch["input_ids"], batch["loss_mask"], batch["attention_mask"])
        if reference is None:
            with disable_adapters(policy):
                ref = sequence_logprobs(policy, batch["input_ids"], batch["loss_mask"], batch["attention_mask"])
        else:
            ref = sequence_logprobs(reference, batch["input_ids"], batch["loss_mask"], batch["attention_mask"])
        kl.append((pi - ref).float().cpu())
    policy.train(was_training)
    kl_t = torch.cat(kl)
    return {"kl": float(kl_t.mean()), "reward": sum(rewards) / len(rewards), "rewards": rewards,
            "response_tokens": sum(lengths) / len(lengths), "n": len(seqs)}


# ------------------------------------------------------------------------------------ the stage
def _reference_for(model: nn.Module, peft: dict[str, Any] | None) -> nn.Module | None:
    """A frozen copy of the SFT model; None (= adapters disabled) when a PEFT method keeps the base frozen."""
    if peft and peft["method"] not in ("last_k", "bitfit"):  # those two train base weights: no "adapters off"
        return None
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def run_dpo(
    init: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    train_cfg: TrainConfig,
    method: DPOConfig | None = None,
    peft: dict[str, Any] | None = None,
    test: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Run:
    """DPO from the run in `init` (the SFT policy, also the reference) on the pairs in `data`; writes a run to `out`.

    method.average_logps=None picks TRL's convention: per-token average log-probs for IPO, sums otherwise.
    method.rpo_alpha adds the chosen answers' per-token NLL to the loss (see `dpo_loss_fn`). With
    method.precompute_ref, pi_ref is just part of the batch source: its log-probs are looked up per pair.
    With `test`, evaluates the implicit-reward accuracy there (eval.json).
    """
    method = method or DPOConfig()
    average = (method.loss_type == "ipo") if method.average_logps is None else bool(method.average_logps)
    if test is not None and not Path(test).exists():
        raise FileNotFoundError(f"{test}: file not found")
    model, tok, base_cfg = load_plain_run(init)
    block = model.config.block_size
    if peft and peft["method"] in ("prefix", "prompt"):
        block -= int(peft.get("num_virtual_tokens", 0))  # the virtual tokens take positions of the context
    prepared = prepare_pairs(tok, data, block, method.val_fraction, train_cfg.seed, "dpo")
    train_enc, val_enc = prepared.train, prepared.val

    model = disable_dropout(apply_peft_spec(disable_dropout(model), peft))
    reference = _reference_for(model, peft)
    device = pick_device(train_cfg.device)
    model.to(device)
    train_get = pair_batches(train_enc, train_cfg.batch_size, tok.pad_id)
    val_get = pair_batches(val_enc, train_cfg.batch_size, tok.pad_id) if val_enc else None
    if method.precompute_ref:
        if reference is not None:
            reference.to(device)
        amp = autocast_dtype(device) if train_cfg.dtype == "auto" else None
        train_get = _with_reference(train_get, precompute_reference_logps(model, reference, train_enc, tok.pad_id,
                                                                          average, amp_dtype=amp))
        if val_get is not None:
            val_get = _with_reference(val_get, precompute_reference_logps(model, reference, val_enc, tok.pad_id,
                                                                          average, amp_dtype=amp))
        reference = None if reference is None else reference.cpu()  # not needed while training

    def get_batch(split: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
        return train_get(split, gen) if split == "train" else val_get(split, gen)

    stats = dict(prepared.stats)
    run_config = run_config_dict(stage="dpo", model=base_cfg["model"], train=train_cfg, peft=peft,
                                 dpo={**asdict(method), "average_logps": average}, init=str(init), data=str(data),
                                 stats=stats)
    out = Path(out)
    save_run_files(out, tok, run_config, resume=resume)
    first_step = checkpoint_step(out) if resume else 0
    log = BatchMetricLog()
    if not method.precompute_ref and reference is not None:
        reference.to(device)
    loss_fn = dpo_loss_fn(reference, method.beta, method.loss_type, method.label_smoothing, average, method.rpo_alpha,
                          log)
    result = train(model, train_cfg, get_batch, loss_fn, out, resume=resume, run_config=run_config,
                   desc="dpo" if not peft else f"dpo[{peft['method']}]", has_val=val_get is not None,
                   progress=progress)
    log.merge_into(out / "metrics.jsonl", train_cfg.grad_accum, train_cfg.eval_iters, first_step)
    if peft:
        save_adapter(model, out / "adapter.pt")
    if test is not None:
        if reference is not None:
            reference.to(device)
        test_pairs, _ = read_preferences(test)
        ev = evaluate_dpo(model, reference, tok, test_pairs, method.beta, average, block_size=block)
        write_json(out / "eval.json", {"data": str(test), **ev})
        stats.update(test_accuracy=ev["rewards/accuracies"], test_margin=ev["rewards/margins"],
                     test_per_kind_accuracy=ev["per_kind_accuracy"])
    return Run(out, model.eval(), tok, result, stats)
