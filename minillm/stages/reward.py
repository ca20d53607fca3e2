"""The reward-model stage: a Bradley-Terry classifier on preference pairs, started from the SFT policy.

The reward model r_phi(x, y) is the SFT network with its language-model head ignored and a scalar head
`score` on the last real token (`minillm.align.reward.RewardModel`, Ouyang et al., 2022). Maximum
likelihood under the Bradley-Terry model (Bradley & Terry, 1952) on comparisons y_w > y_l:

    P(y_w > y_l | x) = exp r(x, y_w) / (exp r(x, y_w) + exp r(x, y_l)) = sigma(r_w - r_l)
    L(phi)           = -mean log sigma(r_w - r_l [- m])  [+ c mean (r_w + r_l)^2]        (TRL RewardTrainer)

i.e. a softmax over the two rewards, or a logistic-regression classifier whose logit is r_w - r_l.
Only differences are identified, so after training the rewards are shifted to mean 0 on responses
sampled from the SFT policy (InstructGPT normalised its RM the same way on demonstrations):

    r_norm(x, y) = r(x, y) - b,    b = mean_i r(x_i, y_i),  y_i ~ pi_SFT(. | x_i)

b is stored as `reward_offset` in the run's config.json, for PPO to use.

A reward run directory holds config.json, ckpt.pt (the RewardModel's weights), tokenizer/, metrics.jsonl,
and, after the held-out evaluation, eval.json and calibration.png. `minillm.runs.load_reward_model` reads it back.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from minillm.align.preferences import (
    BatchMetricLog, EncodedPair, PreferencePair, collate_pairs, disable_dropout, encode_pair, pair_batches,
    prepare_pairs, prompt_text, read_preferences,
)
from minillm.align.reward import RewardModel, bradley_terry_loss_sum, reward_metrics, score_sequences
from minillm.config import RewardConfig, TrainConfig
from minillm.plots import Figure, save_figure
from minillm.runs import Run, checkpoint_step, load_plain_run, save_run_files
from minillm.sampling import generate_completions
from minillm.train import run_config_dict, train
from minillm.utils import write_json

__all__ = [
    "reward_loss_fn", "score_texts", "pair_rewards", "evaluate_reward_model", "calibration",
    "plot_calibration", "reward_offset", "run_reward",
]


# ------------------------------------------------------------------------------------ the loss
def reward_loss_fn(center_coef: float | None = None, log: BatchMetricLog | None = None):
    """loss_fn(model, batch) -> (sum_i -log sigma(r_w,i - r_l,i), B) for `minillm.train`.

    One forward pass over the 2B rows [chosen; rejected]; chunk(2) splits the rewards back into pairs.
    With `log`, each batch's accuracy, margin and reward statistics are recorded (TRL's metric names).
    """

    def loss_fn(model: RewardModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        r = model(batch["input_ids"], attention_mask=batch["attention_mask"]).float()  # (2B,)
        r_w, r_l = r.chunk(2)  # (B,), (B,)
        loss_sum, n_pairs = bradley_terry_loss_sum(r_w, r_l, batch.get("margin"), center_coef)
        if log is not None:
            m = reward_metrics(r_w, r_l)
            log.record(model.training, {"accuracy": m["accuracy"], "margin": m["margin"],
                                        "reward_mean": m["mean"], "reward_std": m["std"]})
        return loss_sum, n_pairs

    return loss_fn


# ------------------------------------------------------------------------------------ scoring
def _prompt_messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def score_texts(rm: RewardModel, tokenizer, prompts: list, responses: list[str], offset: float = 0.0,
                batch_size: int = 64) -> torch.Tensor:
    """r(x, y) - offset for text prompts (str or message lists) and responses, through the chat template; (N,).

    Pass offset=run_config["reward_offset"] for the normalised reward. An empty response is an error
    (the template has no empty turns); a sequence longer than the context is an error too.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"score_texts: {len(prompts)} prompts but {len(responses)} responses")
    block = rm.backbone.config.block_size
    seqs = []
    for i, (p, y) in enumerate(zip(prompts, responses)):
        if not isinstance(y, str) or not y.strip():
            raise ValueError(f"score_texts: response {i} is empty")
        ids, _ = tokenizer.apply_chat_template(_prompt_messages(p) + [{"role": "assistant", "content": y}])
        if len(ids) > block:
            raise ValueError(f"score_texts: pair {i} has {len(ids)} tokens, more than the context ({block})")
        seqs.append(ids)
    return score_sequences(rm, seqs, tokenizer.pad_id, batch_size) - offset


@torch.no_grad()
def pair_rewards(rm: RewardModel, pairs: list[EncodedPair], pad_id: int, batch_size: int = 32
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_w, r_l), each (N,) fp32 on CPU, for encoded pairs."""
    device = next(rm.parameters()).device
    was_training = rm.training
    rm.eval()
    r_w, r_l = [], []
    for start in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[start:start + batch_size], pad_id)
        r = rm(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).float().cpu()
        a, b = r.chunk(2)  # (b,), (b,)
        r_w.append(a)
        r_l.append(b)
    rm.train(was_training)
    return torch.cat(r_w), torch.cat(r_l)


def evaluate_reward_model(rm: RewardModel, tokenizer, pairs: list[PreferencePair], batch_size: int = 32,
                          n_bins: int = 10) -> dict[str, Any]:
    """Pairwise accuracy mean[r_w > r_l] against the pairs' labels (the gold preference for the world's
    files), overall, per `rejected_kind` and per pair, the reward statistics, and the calibration bins."""
    block = rm.backbone.config.block_size
    kept, encoded = [], []
    for p in pairs:
        e = encode_pair(tokenizer, p)
        if max(len(e.chosen_ids), len(e.rejected_ids)) <= block:
            kept.append(p)
            encoded.append(e)
    if not encoded:
        raise ValueError(f"evaluate_reward_model: every pair is longer than the context ({block} tokens)")
    r_w, r_l = pair_rewards(rm, encoded, tokenizer.pad_id, batch_size)
    per_pair = [{"kind": str(p.meta.get("rejected_kind", "all")), "correct": c}
                for p, c in zip(kept, (r_w > r_l).tolist())]
    by_kind: dict[str, list[bool]] = {}
    for pair in per_pair:
        by_kind.setdefault(pair["kind"], []).append(pair["correct"])
    m = reward_metrics(r_w, r_l)
    return {
        "n": len(encoded),
        "dropped_too_long": len(pairs) - len(encoded),
        **m,
        "per_kind_accuracy": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
        "calibration": calibration(r_w, r_l, n_bins),
        "per_pair": per_pair,
        "r_chosen": r_w.tolist(),
        "r_rejected": r_l.tolist(),
    }


# ------------------------------------------------------------------------------------ calibration
def calibration(r_chosen: torch.Tensor, r_rejected: torch.Tensor, n_bins: int = 10) -> dict[str, Any]:
    """Reliability of the predicted preference p = P(a > b) = sigma(r_a - r_b).

    Every pair is counted in both orders, (y_w, y_l) with p = sigma(r_w - r_l) and label 1, and (y_l, y_w) with
    1 - p and label 0, so the diagram covers [0, 1] whatever order a file lists pairs in. With n_bins equal bins:

        predicted[k] = mean p in bin k      empirical[k] = mean label in bin k
        ECE = sum_k (n_k / N) |predicted[k] - empirical[k]|        (expected calibration error)

    A calibrated model has empirical = predicted. Empty bins give NaN.
    """
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be an int >= 1, got {n_bins!r}")
    p = torch.sigmoid((r_chosen - r_rejected).double())  # (N,)
    probs = torch.cat([p, 1 - p])  # (2N,)
    labels = torch.cat([torch.ones_like(p), torch.zeros_like(p)])  # (2N,)
    k = (probs * n_bins).long().clamp(max=n_bins - 1)  # bin of each prediction; p = 1 goes to the last bin
    counts = torch.bincount(k, minlength=n_bins).double()  # (n_bins,)
    pred_sum = torch.bincount(k, weights=probs, minlength=n_bins)
    emp_sum = torch.bincount(k, weights=labels, minlength=n_bins)
    predicted = pred_sum / counts  # NaN where a bin is empty
    empirical = emp_sum / counts
    gap = torch.where(counts > 0, (predicted - empirical).abs() * counts, torch.zeros_like(counts))
    return {
        "bin_edges": torch.linspace(0, 1, n_bins + 1).tolist(),
        "predicted": predicted.tolist(),
        "empirical": empirical.tolist(),
        "counts": counts.long().tolist(),
        "ece": float(gap.sum() / counts.sum()),
    }


def plot_calibration(cal: dict[str, Any], png_path: str | os.PathLike, title: str = "reward model calibration") -> Path:
    """Reliability diagram of `calibration(...)`: empirical vs predicted P(chosen > rejected), bin sizes below."""
    fig = Figure(figsize=(4.5, 5))
    ax, ax_n = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    edges = cal["bin_edges"]
    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    pts = [(x, y) for x, y, n in zip(cal["predicted"], cal["empirical"], cal["counts"]) if n > 0]
    ax.plot([0, 1], [0, 1], ":", color="gray", label="calibrated")
    if pts:
        ax.plot(*zip(*pts), "o-", label=f"reward model (ECE {cal['ece']:.3f})")
    ax.set_ylabel("empirical P(a preferred)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    ax_n.bar(centres, cal["counts"], width=edges[1] - edges[0], color="tab:blue", alpha=0.6)
    ax_n.set_xlabel("predicted P(a > b) = sigma(r_a - r_b)")
    ax_n.set_ylabel("count")
    fig.tight_layout()
    return save_figure(fig, png_path)


# ------------------------------------------------------------------------------------ normalisation
@torch.no_grad()
def reward_offset(rm: RewardModel, policy: torch.nn.Module, tokenizer, prompts: list, temperature: float = 1.0,
                  max_new_tokens: int = 48, seed: int = 0, batch_size: int = 64) -> dict[str, float]:
    """b = mean_i r(x_i, y_i) with y_i ~ pi(. | x_i) sampled from `policy` (the SFT model) at `temperature`.

    Each sample is scored as the chat template renders a finished turn, prompt ++ y ++ <|end|> (also when
    it hit max_new_tokens), so the head reads the same kind of token as in training. Samples that do not
    fit the context are left out. Returns {"reward_offset": b, "reward_std", "n_samples"}.
    """
    block = rm.backbone.config.block_size
    device = next(policy.parameters()).device
    prompt_ids = [tokenizer.apply_chat_template(_prompt_messages(p), add_generation_prompt=True)[0] for p in prompts]
    gen = torch.Generator(device=device).manual_seed(seed)
    outs = generate_completions(policy, prompt_ids, max_new_tokens, eos_id=tokenizer.end_id, batch_size=batch_size,
                                temperature=temperature, generator=gen)
    seqs = [p + y + [tokenizer.end_id] for p, y in zip(prompt_ids, outs)]
    seqs = [s for s in seqs if len(s) <= block]
    if not seqs:
        raise ValueError("reward_offset: no sample fits the context")
    r = score_sequences(rm, seqs, tokenizer.pad_id, batch_size)
    return {"reward_offset": float(r.mean()), "reward_std": float(r.std(correction=0)), "n_samples": len(seqs)}


# ------------------------------------------------------------------------------------ the stage
def run_reward(
    init: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    train_cfg: TrainConfig,
    method: RewardConfig | None = None,
    test: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Run:
    """Train a reward model from the run in `init` on the pairs in `data`; writes a reward run to `out`.

    Then normalises it (`reward_offset` on SFT samples for up to `method.norm_prompts` training prompts) and,
    if `test` is given, evaluates it there (eval.json, calibration.png). Run.model is the RewardModel.
    """
    method = method or RewardConfig()
    if test is not None and not Path(test).exists():
        raise FileNotFoundError(f"{test}: file not found")
    backbone, tok, base_cfg = load_plain_run(init)
    block = backbone.config.block_size
    prepared = prepare_pairs(tok, data, block, method.val_fraction, train_cfg.seed, "reward")
    train_pairs, train_enc, val_enc = prepared.train_pairs, prepared.train, prepared.val
    train_get = pair_batches(train_enc, train_cfg.batch_size, tok.pad_id)
    val_get = pair_batches(val_enc, train_cfg.batch_size, tok.pad_id) if val_enc else None

    def get_batch(split: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
        return train_get(split, gen) if split == "train" else val_get(split, gen)

    torch.manual_seed(train_cfg.seed)  # the score head's initialisation
    rm = RewardModel(disable_dropout(backbone), loglik=method.loglik)
    stats = dict(prepared.stats)
    run_config = run_config_dict(stage="reward", model=base_cfg["model"], train=train_cfg, init=str(init),
                                 data=str(data), reward=method, stats=stats)
    out = Path(out)
    save_run_files(out, tok, run_config, resume=resume)
    first_step = checkpoint_step(out) if resume else 0
    log = BatchMetricLog()
    result = train(rm, train_cfg, get_batch, reward_loss_fn(method.center_coef, log), out, resume=resume,
                   run_config=run_config, desc="reward", has_val=val_get is not None, progress=progress)
    log.merge_into(out / "metrics.jsonl", train_cfg.grad_accum, train_cfg.eval_iters, first_step)

    t0 = time.perf_counter()
    policy, _, _ = load_plain_run(init, device=next(rm.parameters()).device)
    prompts = list(dict.fromkeys(prompt_text(p) for p in train_pairs))[:method.norm_prompts]
    norm = reward_offset(rm, policy, tok, prompts, seed=train_cfg.seed)
    del policy
    run_config.update(norm)
    stats.update(norm, normalise_seconds=time.perf_counter() - t0)
    if test is not None:
        test_pairs, _ = read_preferences(test)
        ev = evaluate_reward_model(rm, tok, test_pairs)
        write_json(out / "eval.json", {k: v for k, v in ev.items() if k not in ("r_chosen", "r_rejected")})
        plot_calibration(ev["calibration"], out / "calibration.png",
                         title=f"{Path(test).name}: accuracy {ev['accuracy']:.2f}")
        stats.update(test_accuracy=ev["accuracy"], test_per_kind_accuracy=ev["per_kind_accuracy"],
                     test_ece=ev["calibration"]["ece"])
        run_config["test"] = {"data": str(test), "accuracy": ev["accuracy"], "ece": ev["calibration"]["ece"]}
    write_json(out / "config.json", run_config)
    return Run(out, rm.eval(), tok, result, stats)
